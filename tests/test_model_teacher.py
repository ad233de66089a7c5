"""The frozen teacher, and the rule that model/ imports nothing distributed."""

import ast
import subprocess
import sys
from pathlib import Path

import torch

from model import TINY_ARCH, TINY_VIT_KWARGS, StudentOutput, create_student, create_teacher

MODEL_DIR = Path(__file__).resolve().parents[1] / "model"


def test_teacher_is_frozen_in_eval_and_returns_logits_and_final_patch_tokens() -> None:
    teacher = create_teacher(TINY_ARCH, **TINY_VIT_KWARGS)
    teacher.train()  # a training loop calling .train() on everything must not wake it up
    assert not teacher.training and not teacher.vit.training
    assert all(not p.requires_grad for p in teacher.parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        out = teacher(x)
        torch.testing.assert_close(out.logits, teacher.vit(x))
    assert out.tokens.shape == (2, 16, 32)


def test_teacher_tokens_have_the_student_token_layout(tmp_path: Path) -> None:
    student = create_student(TINY_ARCH, gate="none", **TINY_VIT_KWARGS).train()
    path = tmp_path / "dense.pth"
    torch.save(student.state_dict(), path)
    teacher = create_teacher(TINY_ARCH, checkpoint=path, **TINY_VIT_KWARGS)
    x = torch.randn(2, 3, 32, 32)
    out: StudentOutput = student(x)
    with torch.inference_mode():
        target = teacher(x)
    torch.testing.assert_close(out.tokens.detach(), target.tokens)
    torch.testing.assert_close(out.logits.detach(), target.logits)


def test_model_package_imports_nothing_distributed() -> None:
    banned = ("deepspeed", "accelerate", "torch.distributed")
    for path in MODEL_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            assert not [n for n in names if n.startswith(banned)], f"{path.name} imports {names}"
    code = "import sys, model; print(','.join(m for m in ('deepspeed', 'accelerate') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=MODEL_DIR.parent)
    assert result.stdout.strip() == ""
