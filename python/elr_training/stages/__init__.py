"""The three training stages, each a elr_training.stages.base.Stage:

    stage 0  TeacherStage   the tiny teacher UNet trained from scratch (built-in default only)
    stage 1  DistillStage   the low-rank student distilled from the frozen teacher (Stage I)
    stage 2  ControlStage   the local control adapter on the frozen backbone (Stage II)
"""

from .base import Stage
from .control import ControlStage
from .distill import DistillStage
from .teacher import TeacherStage

STAGES = {stage.number: stage for stage in (TeacherStage, DistillStage, ControlStage)}

__all__ = ["Stage", "TeacherStage", "DistillStage", "ControlStage", "STAGES"]
