"""plan_step: one training step on tensors without data, and what it would take on a card.

    from elr_ext.plan import PlannedStep, plan_step

    def build():                       # runs under FakeTensorMode: every tensor made here is fake
        unet = UNet2DConditionModel(**config)
        opt = torch.optim.AdamW(trained, lr=1e-5, foreach=True)
        return PlannedStep(models={"unet": unet}, loss=lambda: ..., optimizer=opt)

    plan = plan_step(build, device="v100-32gb", autocast_dtype=torch.float16)
    print(plan.format())

One step is traced; its optimiser state exists only from the optimiser phase on, and the peak of
every later step follows from it (steady_peak); the first step's own peak is kept too. The tensors are fake CPU tensors (autograd
cannot run on fake CUDA tensors without a GPU); for a GPU plan the step runs with CUDA's rules where
they differ from the CPU's: the card's attention kernels (elr_ext.plan.attention), CUDA autocast's
fp32 ops (group_norm, layer_norm, softmax, log_softmax, mse_loss run in fp32 under autocast on CUDA,
in the low precision on the CPU), allocations rounded to the caching allocator's 512-byte blocks,
and our ops' workspaces as the CUDA kernels allocate them (PLAN_WORKSPACES of each op in elr_ext/ops,
sized for the backend elr_ext.backends.planned_backend names: "cuda" for a card, "cpu" otherwise).

What torch's own tools give and where they fall short here: torch.distributed._tools.mem_tracker's
MemTracker splits memory the same way, but its categories come from module hooks and it has no
notion of the planned card's kernels; runtime_estimator.RuntimeEstimator's roofline reads the peak
FLOPs of the GPU it runs on, so it cannot estimate for a card that is not there. FlopCounterMode's
formulas are used as they are (flop_registry), ours included.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import backends
from ..nn.counting import count_parameters
from .attention import FLASH_WORKSPACES, card_attention
from .devices import GIB, DeviceSpec, device_spec, fits
from .tracker import KINDS, Peak, PlanError, StepTracker

CUDA_BLOCK = 512  # the CUDA caching allocator rounds every block up to this
# ops CUDA autocast runs in fp32 and CPU autocast leaves in the low precision (torch.amp's op lists)
_CUDA_FP32_FUNCTIONS = ("group_norm", "layer_norm", "softmax", "log_softmax", "mse_loss")


@dataclass
class PlannedStep:
    """What plan_step runs: `loss()` is the forward pass and the loss of one batch; the planner runs
    backward, the optimiser step and zero_grad(set_to_none=True) itself."""

    models: Dict[str, nn.Module]
    loss: Callable[[], torch.Tensor]
    optimizer: torch.optim.Optimizer
    max_grad_norm: float = 0.0  # clip_grad_norm_ before the optimiser step, as the training loop does


@dataclass
class StepPlan:
    device: Optional[DeviceSpec]  # None: a CPU plan (memory only)
    peak: Peak  # the steady step's
    first_step_peak: Peak
    costs: Dict[tuple, object]  # (phase, op) -> OpCost of the steady step
    trainable_params: int
    total_params: int
    seconds_to_plan: float
    description: str = ""
    notes: List[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return max(self.peak.total, self.first_step_peak.total)

    @property
    def flops(self) -> float:
        return sum(c.flops for c in self.costs.values())

    @property
    def bytes_moved(self) -> float:
        return sum(c.bytes for c in self.costs.values())

    @property
    def seconds(self) -> Optional[float]:
        return None if self.device is None else sum(c.seconds for c in self.costs.values())

    def phase_totals(self) -> Dict[str, dict]:
        out: Dict[str, dict] = {}
        for (phase, _), c in self.costs.items():
            t = out.setdefault(phase, {"flops": 0.0, "bytes": 0.0, "seconds": 0.0, "calls": 0})
            t["flops"] += c.flops
            t["bytes"] += c.bytes
            t["seconds"] += c.seconds
            t["calls"] += c.calls
        return out

    @property
    def fits(self) -> Optional[bool]:
        return None if self.device is None else fits(self.device, self.peak_bytes)

    def top_ops(self, n: int = 8) -> List[tuple]:
        key = (lambda kv: kv[1].seconds) if self.device is not None else (lambda kv: kv[1].flops)
        return sorted(self.costs.items(), key=key, reverse=True)[:n]

    def to_dict(self) -> dict:
        return {
            "device": self.device.name if self.device else "cpu",
            "description": self.description,
            "peak_bytes": self.peak_bytes,
            "peak": {"total": self.peak.total, "split": self.peak.split, "phase": self.peak.phase,
                     "where": self.peak.where, "op": self.peak.op},
            "first_step_peak_bytes": self.first_step_peak.total,
            "flops": self.flops, "bytes_moved": self.bytes_moved, "seconds": self.seconds,
            "phases": self.phase_totals(), "fits": self.fits,
            "trainable_params": self.trainable_params, "total_params": self.total_params,
            "seconds_to_plan": self.seconds_to_plan, "notes": self.notes,
            "top_ops": [{"phase": p, "op": o, "calls": c.calls, "flops": c.flops, "bytes": c.bytes,
                         "seconds": c.seconds} for (p, o), c in self.top_ops()],
        }

    def format(self) -> str:
        gib, tf = _bytes, _flops
        card = self.device.description if self.device else "this CPU (fake CPU tensors)"
        lines = [f"plan of one training step on {card}" + (f": {self.description}" if self.description else ""),
                 f"  parameters: {self.trainable_params:,} trained of {self.total_params:,}",
                 f"  peak memory {gib(self.peak_bytes)} in the {self.peak.phase} pass"
                 + (f", at {self.peak.op} in {self.peak.where}" if self.peak.where else f", at {self.peak.op}")]
        for kind in KINDS:
            lines.append(f"    {kind:<16} {gib(self.peak.split.get(kind, 0)):>12}")
        if self.first_step_peak.total > self.peak.total:
            lines.append(f"  (the first step, which allocates the optimiser state, peaks higher: "
                         f"{gib(self.first_step_peak.total)})")
        phases = self.phase_totals()
        lines.append(f"  FLOPs {tf(self.flops)} (" + ", ".join(
            f"{p} {tf(t['flops'])}" for p, t in phases.items()) + f"); bytes moved {gib(self.bytes_moved)}")
        if self.device is not None:
            lines.append(f"  roofline time {self.seconds:.3f} s/step (" + ", ".join(
                f"{p} {t['seconds']:.3f} s" for p, t in phases.items()) + "): sum over ops of "
                "max(FLOPs / peak, bytes / bandwidth), a lower bound (no launch gaps, no efficiency loss)")
            lines.append(f"  fits on {self.device.name} ({self.device.memory_gib:g} GiB): "
                         f"{'yes' if self.fits else 'NO'} (peak x 1.05 + 1 GiB for the CUDA context and "
                         f"allocator: {gib(self.peak_bytes * 1.05 + GIB)})")
        lines.append("  top ops: " + "; ".join(
            f"{p}/{o} x{c.calls} {tf(c.flops)}" + (f" {c.seconds * 1e3:.1f} ms" if self.device else "")
            for (p, o), c in self.top_ops(5)))
        lines.extend(f"  note: {n}" for n in self.notes)
        lines.append(f"  planned in {self.seconds_to_plan:.1f} s")
        return "\n".join(lines)


def _bytes(b: float) -> str:
    return f"{b / GIB:.2f} GiB" if abs(b) >= GIB else f"{b / 2 ** 20:.1f} MiB"


def _flops(f: float) -> str:
    return f"{f / 1e12:.2f} TFLOP" if f >= 1e12 else f"{f / 1e9:.2f} GFLOP"


@contextlib.contextmanager
def cuda_autocast_rules():
    """CUDA autocast runs these functions in fp32; CPU autocast does not: cast their inputs up while
    CPU autocast (the plan's stand-in for CUDA's) is on."""
    originals = {name: getattr(F, name) for name in _CUDA_FP32_FUNCTIONS}

    def upcast(original):
        def run(input, *args, **kwargs):
            if torch.is_autocast_enabled("cpu") and input.dtype in (torch.float16, torch.bfloat16):
                with torch.autocast("cpu", enabled=False):
                    args = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
                    kwargs = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                              for k, v in kwargs.items()}
                    return original(input.float(), *args, **kwargs)
            return original(input, *args, **kwargs)
        return run

    for name, original in originals.items():
        setattr(F, name, upcast(original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(F, name, original)


@contextlib.contextmanager
def conversions_without_swap():
    """Module.to / .half / .float on fake parameters: nn.Module._apply swaps a FakeTensor parameter
    with its converted copy (torch.utils.swap_tensors), which refuses tensors that FakeTensorMode holds
    weak references to. While the plan runs, _apply replaces each parameter and buffer with the
    converted one instead (what torch does for tensors whose types differ); a parameter shared by
    several modules stays shared."""
    original = nn.Module._apply

    def apply(self, fn, recurse=True):
        # A loop, not a recursive closure: a closure that calls itself is a reference cycle, which
        # would keep its memo, and with it every tensor it maps (the parameters before conversion),
        # alive until the garbage collector happens to run, and the plan would count them.
        memo: Dict[int, torch.Tensor] = {}
        for module in (self.modules() if recurse else [self]):
            for key, param in module._parameters.items():
                if param is not None:
                    if id(param) not in memo:
                        with torch.no_grad():
                            applied = fn(param)
                        memo[id(param)] = param if applied is param else \
                            nn.Parameter(applied, requires_grad=param.requires_grad)
                    module._parameters[key] = memo[id(param)]
            for key, buf in module._buffers.items():
                if buf is not None:
                    if id(buf) not in memo:
                        memo[id(buf)] = fn(buf)
                    module._buffers[key] = memo[id(buf)]
        return self

    nn.Module._apply = apply
    try:
        yield
    finally:
        nn.Module._apply = original


def _module_names(models: Dict[str, nn.Module]) -> Dict[int, str]:
    names = {}
    for model_name, model in models.items():
        for qualified, module in model.named_modules():
            names.setdefault(id(module), f"{model_name}.{qualified}" if qualified else model_name)
    return names


def _trained(models: Dict[str, nn.Module]) -> List[nn.Parameter]:
    seen, out = set(), []
    for model in models.values():
        for p in model.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def _where_in_user_code(error: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if "/torch/" not in f.filename and "elr_ext/plan/" not in f.filename]
    return f" (at {frames[-1].filename}:{frames[-1].lineno}: {frames[-1].line})" if frames else ""


def plan_step(build: Callable[[], PlannedStep], device: Union[str, DeviceSpec] = "v100-32gb",
              autocast_dtype: Optional[torch.dtype] = None, description: str = "") -> StepPlan:
    """Run `build()` and one training step on fake tensors: the plan of a steady step (steady_peak).

    device: a card of elr_ext.plan.DEVICES (or its DeviceSpec), or "cpu" (memory as the CPU kernels
    allocate it, no time estimate). autocast_dtype: the mixed precision of the step (None: fp32)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode, ShapeEnv

    spec = None if device == "cpu" else (device if isinstance(device, DeviceSpec) else device_spec(device))
    started = time.perf_counter()
    workspaces = {}
    for op in ("fdn", "kron_lora", "lowrank_proj"):  # the modules (elr_ext.ops exports functions of these names)
        workspaces.update(importlib.import_module(f"elr_ext.ops.{op}").PLAN_WORKSPACES)
    workspaces.update(FLASH_WORKSPACES if spec else {})
    tracker = StepTracker(spec, {}, round_to=CUDA_BLOCK if spec else 1, workspaces=workspaces)
    with contextlib.ExitStack() as stack:
        stack.enter_context(FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True))
        stack.enter_context(tracker)
        stack.enter_context(backends.planned_backend("cuda" if spec else "cpu"))
        stack.enter_context(conversions_without_swap())
        if spec is not None:
            stack.enter_context(card_attention(spec))
            if autocast_dtype is not None:
                stack.enter_context(cuda_autocast_rules())
        try:
            step = build()
            plan = _run_steps(step, tracker, spec, autocast_dtype, description, started)
        except GuardOnDataDependentSymNode as error:
            raise PlanError("the step branches on the value of a tensor, which a plan does not have"
                            f"{_where_in_user_code(error)}: {str(error).splitlines()[0]}") from None
        finally:
            # every fake tensor dies while the mode that made it is still active: the models and
            # the optimiser of the step, and any cycle holding them
            step = None
            gc.collect()
            tracker.forget()
    return plan


def _run_steps(step: PlannedStep, tracker: StepTracker, spec, autocast_dtype, description, started):
    tracker.module_names.update(_module_names(step.models))
    for model in step.models.values():
        for t in list(model.parameters()) + list(model.buffers()):
            tracker.classify(t, "weights")
    trained = _trained(step.models)
    hooks = [p.register_post_accumulate_grad_hook(lambda p: tracker.classify(p.grad, "gradients")) for p in trained]
    module_hooks = [nn.modules.module.register_module_forward_pre_hook(lambda m, a: tracker.enter_module(m)),
                    nn.modules.module.register_module_forward_hook(lambda m, a, o: tracker.exit_module(m))]
    try:
        tracker.start_phase("forward")
        with (torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()):
            loss = step.loss()
        tracker.start_phase("backward")
        tracker.module_stack.clear()
        loss.backward()
        del loss
        tracker.start_phase("optimizer")
        if step.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trained, step.max_grad_norm)
        step.optimizer.step()
        step.optimizer.zero_grad(set_to_none=True)
        for state in step.optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    tracker.classify(value, "optimizer state")
    finally:
        for h in hooks + module_hooks:
            h.remove()
    first, steady = steady_peak(tracker.phase_peaks, tracker.totals["optimizer state"])
    notes = []
    if spec is not None and autocast_dtype == torch.bfloat16 and spec.bf16_tflops is None:
        notes.append(f"{spec.name} has no bf16 tensor cores: bf16 products are timed at its fp32 peak")
    return StepPlan(spec, steady, first, dict(tracker.costs), sum(p.numel() for p in trained),
                    count_parameters(*step.models.values()), time.perf_counter() - started, description, notes)


def steady_peak(phase_peaks: Dict[str, Peak], state_bytes: int):
    """(first step's peak, every later step's peak). The traced step is the first: its optimiser
    state appears only in the optimiser phase. In every later step the state is there from the start,
    so the forward and backward peaks rise by its size; nothing else differs (set_to_none leaves no
    gradients between steps)."""
    steps = []
    for p in (p for name, p in phase_peaks.items() if name != "build"):
        if p.phase == "optimizer" and p.split.get("temporaries", 0) >= state_bytes:
            # torch.optim and bitsandbytes create every state tensor before the update's arithmetic, so
            # at the optimiser phase's peak the whole state exists; it was labelled optimizer state only
            # once the step was over
            split = dict(p.split)
            split["temporaries"] -= state_bytes
            split["optimizer state"] = split.get("optimizer state", 0) + state_bytes
            p = Peak(p.total, split, p.phase, p.where, p.op)
        steps.append(p)
    first = max(steps, key=lambda p: p.total)
    later = []
    for p in steps:
        if p.phase in ("forward", "backward"):
            split = dict(p.split)
            split["optimizer state"] = split.get("optimizer state", 0) + state_bytes
            p = Peak(p.total + state_bytes, split, p.phase, p.where, p.op)
        later.append(p)
    return first, max(later, key=lambda p: p.total)
