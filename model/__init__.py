"""Token-pruned Vision Transformers on top of timm: students with gates, the teacher, the FLOPs counter.

    student = create_student("deit_small_patch16_224", gate="dynamicvit", keep_ratio=0.7)
    out = student.train()(images)      # StudentOutput: logits, tokens, keep_masks, flops, keep_ratios
    logits = student.eval()(images)    # dropped tokens gathered away; see student.last_keep_counts
    teacher = create_teacher("deit_small_patch16_224", checkpoint="dense.pth")
    gmacs = count_flops(student, 224)  # analytic MACs, as in the DynamicViT / AS-ViT tables

Imports nothing distributed (no deepspeed, accelerate or torch.distributed): backends wrap these
modules from outside. `python -m model.bench {inference,train-step}` times dense vs pruned.
"""

from model.backbone import TINY_ARCH, TINY_VIT_KWARGS
from model.flops import count_flops
from model.gates import default_locations
from model.student import PrunedViT, StudentOutput, create_student
from model.teacher import Teacher, TeacherOutput, create_teacher

__all__ = [
    "TINY_ARCH",
    "TINY_VIT_KWARGS",
    "PrunedViT",
    "StudentOutput",
    "Teacher",
    "TeacherOutput",
    "count_flops",
    "create_student",
    "create_teacher",
    "default_locations",
]
