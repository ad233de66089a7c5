"""Distribution is applied from outside: only the backend modules import deepspeed or accelerate."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BACKEND_MODULES = {"deepspeed": "trainer/backends/deepspeed_backend.py",
                   "accelerate": "trainer/backends/accelerate_backend.py"}


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def test_data_package_imports_nothing_distributed():
    for path in (ROOT / "data").glob("*.py"):
        bad = [n for n in _imports(path) if n.startswith(("deepspeed", "accelerate", "torch.distributed"))]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_only_the_backend_modules_import_deepspeed_or_accelerate():
    for path in (ROOT / "trainer").rglob("*.py"):
        rel = str(path.relative_to(ROOT))
        for lib, owner in BACKEND_MODULES.items():
            if rel != owner:
                assert not [n for n in _imports(path) if n.split(".")[0] == lib], f"{rel} imports {lib}"
