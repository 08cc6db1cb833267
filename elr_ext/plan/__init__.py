"""Plan a training step before running it: peak memory by kind, FLOPs, and a roofline time on a named
card, from one step on tensors that have shapes and no data (docs/planning.md).

    plan = elr_ext.plan.plan_step(build, device="rtx4090-24gb", autocast_dtype=torch.bfloat16)
    print(plan.format())
"""

from .devices import DEVICES, DeviceSpec, device_spec, fits
from .process import CRASH_SIGNALS, PLAN_TRIES, crash_signal, run_plan_process
from .step import PlannedStep, StepPlan, plan_step
from .tracker import KINDS, PlanError

__all__ = ["CRASH_SIGNALS", "DEVICES", "DeviceSpec", "KINDS", "PLAN_TRIES", "PlanError", "PlannedStep", "StepPlan",
           "crash_signal", "device_spec", "fits", "plan_step", "run_plan_process"]
