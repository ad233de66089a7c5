"""Token-pruned Vision Transformers on top of timm: students with gates, the teacher, the FLOPs counter.

Imports nothing distributed (no deepspeed, accelerate or torch.distributed): backends wrap these
modules from outside.
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
