"""The shape of the code, enforced: layering of the packages, where distribution libraries may be
imported, and short functions. docs/ARCHITECTURE.md explains the rules."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "data", "trainer")
BACKEND_MODULES = {"deepspeed": "trainer/infra/backends/deepspeed_backend.py",
                   "accelerate": "trainer/infra/backends/accelerate_backend.py"}
# Command-line leaves: nothing imports them for library code (the demo runs them as subprocesses).
CLI_MODULES = ("trainer.train", "trainer.evaluate", "trainer.export", "trainer.bench", "trainer.check_config",
               "trainer.demo")
MAX_FUNCTION_LINES = 90


def _sources(*folders: str, root: Path = ROOT) -> list[Path]:
    return sorted(p for folder in folders for p in (root / folder).rglob("*.py"))


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]  # `from trainer import train`
    return names


def _within(name: str, module: str) -> bool:
    return name == module or name.startswith(module + ".")


def cli_imports(root: Path = ROOT) -> list[str]:
    """Library modules that import a command-line tool's module."""
    found = []
    for path in _sources(*PACKAGES, root=root):
        me = _module_name(path, root)
        for cli in CLI_MODULES:
            if not _within(me, cli):  # a tool's own package may (trainer.demo.__main__ -> .pipeline)
                found += [f"{me} imports {n}" for n in _imports(path) if _within(n, cli)]
    return found


def infra_imports_of_the_loop(root: Path = ROOT) -> list[str]:
    """Infrastructure modules that import the loop or the demo."""
    return [f"{_module_name(path, root)} imports {n}" for path in _sources("trainer/infra", root=root)
            for n in _imports(path) if _within(n, "trainer.loop") or _within(n, "trainer.demo")]


def long_functions(root: Path = ROOT) -> list[str]:
    """Functions of more than MAX_FUNCTION_LINES lines."""
    found = []
    for path in _sources(*PACKAGES, root=root):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_model_and_data_import_nothing_from_trainer_and_nothing_distributed():
    for path in _sources("model", "data"):
        bad = [n for n in _imports(path)
               if _within(n, "trainer") or n.startswith(("deepspeed", "accelerate", "torch.distributed"))]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_no_library_module_imports_a_command_line_tool():
    assert not cli_imports()


def test_infrastructure_does_not_import_the_loop():
    assert not infra_imports_of_the_loop()


def test_only_the_backend_modules_import_deepspeed_or_accelerate():
    for path in _sources(*PACKAGES):
        rel = str(path.relative_to(ROOT))
        for lib, owner in BACKEND_MODULES.items():
            if rel != owner:
                assert not [n for n in _imports(path) if n.split(".")[0] == lib], f"{rel} imports {lib}"


def test_no_function_is_longer_than_90_lines():
    assert not long_functions(), f"split these (at most {MAX_FUNCTION_LINES} lines)"


@pytest.mark.parametrize("rule", ["length", "cli", "infra"])
def test_the_shape_checks_catch_a_planted_violation(tmp_path, rule):
    """Negative control: each check finds a violation planted in a copy of the layout."""
    planted = tmp_path / "trainer" / "infra" / "planted.py"
    planted.parent.mkdir(parents=True)
    for pkg in ("model", "data"):
        (tmp_path / pkg).mkdir()
    planted.write_text({"length": "def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES,
                        "cli": "from trainer.evaluate import main\n",
                        "infra": "from trainer.loop.build import Run\n"}[rule])
    check = {"length": long_functions, "cli": cli_imports, "infra": infra_imports_of_the_loop}[rule]
    assert [v for v in check(tmp_path) if "planted" in v]
