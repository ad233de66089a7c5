"""Loading weight files: timm/DeiT/student formats, .pth and .safetensors, and clear errors on mismatch."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model import TINY_ARCH, TINY_VIT_KWARGS, create_student, create_teacher


def dense_student(seed: int = 3, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_student(TINY_ARCH, gate="none", **{**TINY_VIT_KWARGS, **overrides})


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("fmt", ["plain.pth", "deit.pth", "plain.safetensors", "ddp.bin", "dense_student.pth"])
def test_timm_weights_load_unchanged_into_gated_students_and_teacher(tmp_path: Path, fmt: str) -> None:
    source = dense_student()
    sd = source.vit.state_dict()
    path = tmp_path / f"weights.{fmt}"
    if fmt == "deit.pth":
        torch.save({"model": sd, "epoch": 300}, path)
    elif fmt.endswith("safetensors"):
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif fmt == "ddp.bin":
        torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    elif fmt == "dense_student.pth":  # the whole gate="none" student: vit.* keys, no gates
        torch.save(source.state_dict(), path)
    else:
        torch.save(sd, path)
    for gate in ("dynamicvit", "asvit"):
        torch.manual_seed(7)
        fresh_gates = create_student(TINY_ARCH, gate=gate, **TINY_VIT_KWARGS).gates.state_dict()
        torch.manual_seed(7)
        student = create_student(TINY_ARCH, gate=gate, checkpoint=path, **TINY_VIT_KWARGS)
        assert_same_weights(student.vit, source.vit)
        for key, value in fresh_gates.items():  # the gates keep their init
            torch.testing.assert_close(student.gates.state_dict()[key], value, rtol=0, atol=0)
    teacher = create_teacher(TINY_ARCH, checkpoint=path, **TINY_VIT_KWARGS)
    assert_same_weights(teacher.vit, source.vit)


def test_whole_student_file_loads_gates_too_and_loads_into_the_teacher(tmp_path: Path) -> None:
    torch.manual_seed(4)
    trained = create_student(TINY_ARCH, gate="asvit", **TINY_VIT_KWARGS)
    with torch.no_grad():
        trained.gates[1].threshold.fill_(0.123)
    path = tmp_path / "student.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(path))
    restored = create_student(TINY_ARCH, gate="asvit", checkpoint=path, **TINY_VIT_KWARGS)
    assert_same_weights(restored, trained)
    teacher = create_teacher(TINY_ARCH, checkpoint=path, **TINY_VIT_KWARGS)
    assert_same_weights(teacher.vit, trained.vit)


def test_wrong_shapes_fail_naming_the_keys_and_shapes(tmp_path: Path) -> None:
    path = tmp_path / "five_classes.pth"
    torch.save(dense_student(num_classes=5).vit.state_dict(), path)
    with pytest.raises(ValueError, match=r"head\.weight: file \(5, 32\) vs model \(10, 32\)") as err:
        create_student(TINY_ARCH, gate="dynamicvit", checkpoint=path, **TINY_VIT_KWARGS)
    assert "head.bias" in str(err.value)


def test_missing_and_unexpected_keys_fail_naming_them(tmp_path: Path) -> None:
    sd = dense_student().vit.state_dict()
    sd.pop("blocks.1.mlp.fc2.weight")
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    expected = r"missing keys: blocks\.1\.mlp\.fc2\.weight.*unexpected keys: extra\.weight"
    with pytest.raises(ValueError, match=expected):
        create_teacher(TINY_ARCH, checkpoint=path, **TINY_VIT_KWARGS)


def test_gate_weights_of_another_gate_type_are_an_error(tmp_path: Path) -> None:
    path = tmp_path / "dynamicvit_student.pth"
    torch.save(create_student(TINY_ARCH, gate="dynamicvit", **TINY_VIT_KWARGS).state_dict(), path)
    with pytest.raises(ValueError, match="gate weights.*threshold"):
        create_student(TINY_ARCH, gate="asvit", checkpoint=path, **TINY_VIT_KWARGS)


def test_position_embedding_is_resized_by_timm_when_the_resolution_changes(tmp_path: Path) -> None:
    path = tmp_path / "at32.pth"
    source = dense_student()
    torch.save(source.vit.state_dict(), path)
    kwargs = {**TINY_VIT_KWARGS, "img_size": 48}
    student = create_student(TINY_ARCH, gate="dynamicvit", checkpoint=path, **kwargs)
    assert student.vit.pos_embed.shape == (1, 1 + 36, 32)
    torch.testing.assert_close(student.vit.blocks[0].attn.qkv.weight, source.vit.blocks[0].attn.qkv.weight)


def test_a_missing_file_or_a_non_state_dict_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        create_teacher(TINY_ARCH, checkpoint=tmp_path / "nope.pth", **TINY_VIT_KWARGS)
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="state dict"):
        create_teacher(TINY_ARCH, checkpoint=path, **TINY_VIT_KWARGS)
