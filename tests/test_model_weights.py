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
    path = tmp_path / "wider_mlp.pth"
    torch.save(dense_student(mlp_ratio=2.0).vit.state_dict(), path)
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.fc1\.weight: file \(64, 32\) vs model \(128, 32\)"):
        create_student(TINY_ARCH, gate="dynamicvit", checkpoint=path, **TINY_VIT_KWARGS)


def test_weights_of_another_label_set_load_with_the_head_reinitialised(tmp_path: Path, caplog) -> None:
    """Fine-tuning to your own classes: the file's 5-class head does not fit a 10-class model, so the model
    keeps its own freshly initialised head (timm's rule), everything else loads, and a log line says so."""
    source = dense_student(num_classes=5)
    path = tmp_path / "five_classes.pth"
    torch.save(source.vit.state_dict(), path)
    torch.manual_seed(11)
    fresh_head = create_student(TINY_ARCH, gate="none", **TINY_VIT_KWARGS).vit.head.weight.detach().clone()
    torch.manual_seed(11)
    with caplog.at_level("WARNING", logger="model.weights"):
        student = create_student(TINY_ARCH, gate="none", checkpoint=path, **TINY_VIT_KWARGS)
    assert "re-initialising the classifier 'head': the file has 5 classes, the model 10" in caplog.text
    assert torch.equal(student.vit.head.weight, fresh_head)
    own, theirs = student.vit.state_dict(), source.vit.state_dict()
    for key in own:
        if not key.startswith("head."):
            torch.testing.assert_close(own[key], theirs[key], rtol=0, atol=0, msg=key)


def test_timm_pretrained_with_a_local_file_and_another_class_count(tmp_path: Path) -> None:
    """`model.kwargs: {pretrained: true, pretrained_cfg_overlay: {file: ...}}`: timm's own loading path, offline."""
    from trainer.config import load_config, validate

    source = dense_student(num_classes=5)
    path = tmp_path / "hub_copy.pth"
    torch.save(source.vit.state_dict(), path)
    kwargs = {**TINY_VIT_KWARGS, "pretrained": True, "pretrained_cfg_overlay": {"file": str(path)}}
    student = create_student(TINY_ARCH, gate="dynamicvit", **kwargs)
    torch.testing.assert_close(student.vit.blocks[1].attn.qkv.weight, source.vit.blocks[1].attn.qkv.weight)
    assert student.vit.head.weight.shape == (10, 32)
    cfg = load_config(None, ["model.arch=" + TINY_ARCH, "model.img_size=32", "model.num_classes=10",
                             "model.kwargs={patch_size: 8, depth: 4, embed_dim: 32, num_heads: 2, pretrained: true, "
                             f"pretrained_cfg_overlay: {{file: {path}}}}}", "data.train=x", "teacher.enabled=false",
                             "prune.w_kd=0", "prune.w_tok=0", "train.steps=1"])
    validate(cfg, check_paths=False)  # was: "multiple values for keyword argument 'pretrained'"


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


def test_model_pretrained_key_builds_from_timm_weights_offline(tmp_path: Path) -> None:
    """`model.pretrained: true`: timm's pretrained path for student and teacher, here from a local file."""
    from trainer.config import load_config
    from trainer.loop.build import build_student, build_teacher

    source = dense_student(num_classes=5)
    path = tmp_path / "hub_copy.pth"
    torch.save(source.vit.state_dict(), path)
    cfg = load_config(None, ["model.arch=" + TINY_ARCH, "model.img_size=32", "model.num_classes=10",
                             "model.pretrained=true", "model.kwargs={patch_size: 8, depth: 4, embed_dim: 32, "
                             f"num_heads: 2, pretrained_cfg_overlay: {{file: {path}}}}}"])
    student, teacher = build_student(cfg), build_teacher(cfg, torch.device("cpu"))
    for model in (student, teacher):
        torch.testing.assert_close(model.vit.blocks[0].mlp.fc1.weight, source.vit.blocks[0].mlp.fc1.weight)
        assert model.vit.head.weight.shape == (10, 32)
