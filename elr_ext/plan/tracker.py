"""Memory and cost accounting of one traced training step (elr_ext.plan.plan_step runs it).

`StepTracker` is a TorchDispatchMode that sits inside a FakeTensorMode: every op of the step reaches
it with fake tensors (shapes, dtypes, no data). For each op it

- registers the storages the op creates (weakref.finalize on each untyped storage tells when the
  last tensor of it dies) and keeps a running total per kind of memory, and the peak: the total, its
  split, and where in the step it fell (phase, module, op);
- adds the op's cost: FLOPs from torch.utils.flop_counter's formulas (ours are registered next to
  the fake kernels in elr_ext/ops/), bytes moved (every tensor read and written; views move none),
  and a roofline time max(FLOPs / peak, bytes / bandwidth) for the planned card.

Kinds of memory: weights (parameters and buffers), gradients (a trained parameter's .grad),
optimizer state (what optimizer.state holds after a step), activations (created in the forward
pass with autograd recording: what the backward will read, and the short-lived outputs around it),
temporaries (everything else: no-grad forwards of frozen models, gradients of intermediate values,
the optimiser's scratch, kernel workspaces), inputs (the batch and other tensors alive before the
step).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry
from torch.utils.weak import WeakIdKeyDictionary

from .devices import DeviceSpec

KINDS = ("weights", "gradients", "optimizer state", "activations", "temporaries", "inputs")

# ops that move no data (metadata, or a view of their input)
_FREE_OPS = {"detach", "view", "_unsafe_view", "expand", "t", "transpose", "permute", "as_strided",
             "alias", "slice", "select", "squeeze", "unsqueeze", "split", "split_with_sizes", "unbind",
             "chunk", "unfold", "diagonal", "lift_fresh", "empty", "empty_like", "empty_strided",
             "new_empty", "new_empty_strided", "device", "_local_scalar_dense", "sym_size", "sym_stride",
             "sym_numel", "sym_storage_offset", "is_same_size", "_has_compatible_shallow_copy_type",
             "set_", "resize_"}
_KIND_OF_PRODUCT = {"convolution": "conv", "convolution_backward": "conv"}


class PlanError(RuntimeError):
    """A part of the step that cannot be planned (named in the message) instead of a wrong number."""


@dataclass
class OpCost:
    calls: int = 0
    flops: float = 0.0
    bytes: float = 0.0
    seconds: float = 0.0


@dataclass
class Peak:
    total: int = 0
    split: Dict[str, int] = field(default_factory=dict)
    phase: str = ""
    where: str = ""
    op: str = ""


class StepTracker(TorchDispatchMode):
    def __init__(self, spec: Optional[DeviceSpec], module_names: Dict[int, str], round_to: int = 1,
                 workspaces=None):
        super().__init__()
        self.spec = spec
        self.module_names = module_names  # id(module) -> qualified name
        self.round_to = round_to  # the allocator's block size (512 B on CUDA)
        self.workspaces = workspaces or {}  # op name -> fn(args, kwargs) -> [(shape, dtype)] (the card's kernels)
        self.by_storage = WeakIdKeyDictionary()
        self.refs: Dict[int, weakref.ref] = {}  # token -> the weak reference whose callback frees it
        self.live: Dict[int, list] = {}  # token -> [bytes, kind]
        self.totals = {k: 0 for k in KINDS}
        self.current = 0
        self.phase = "build"
        self.phase_peaks: Dict[str, Peak] = {}  # the highest total of each phase, its split and place
        self.costs: Dict[Tuple[str, str], OpCost] = {}
        self.module_stack = []
        self.node_where: Dict[int, str] = {}
        self._next = 0
        self._op = ""

    # ------------------------------------------------------------------ memory
    def _register(self, t: torch.Tensor, kind: str) -> None:
        storage = t.untyped_storage()
        if self.by_storage.get(storage) is not None:
            return
        nbytes = storage.nbytes()
        nbytes = -(-nbytes // self.round_to) * self.round_to
        token, self._next = self._next, self._next + 1
        self.by_storage[storage] = token
        self.live[token] = [nbytes, kind]
        self.refs[token] = weakref.ref(storage, lambda _, token=token: self._release(token))
        self.totals[kind] += nbytes
        self.current += nbytes
        if self.current > self.phase_peaks.get(self.phase, Peak()).total:
            self.phase_peaks[self.phase] = Peak(self.current, dict(self.totals), self.phase, self.where(), self._op)

    def forget(self) -> None:
        """Drop the weak references to the storages still alive (the plan is over)."""
        self.refs.clear()
        self.by_storage = WeakIdKeyDictionary()

    def _release(self, token: int) -> None:
        self.refs.pop(token, None)
        nbytes, kind = self.live.pop(token)
        self.totals[kind] -= nbytes
        self.current -= nbytes

    def classify(self, t: torch.Tensor, kind: str) -> None:
        """(Re)label the storage of `t`; registers it first if it was made outside the tracker."""
        storage = t.untyped_storage()
        token = self.by_storage.get(storage)
        if token is None:
            self._register(t, kind)
            return
        entry = self.live[token]
        if entry[1] != kind:
            self.totals[entry[1]] -= entry[0]
            self.totals[kind] += entry[0]
            entry[1] = kind

    def kind_of_new(self) -> str:
        if self.phase == "forward" and torch.is_grad_enabled():
            return "activations"
        return "inputs" if self.phase == "build" else "temporaries"

    def start_phase(self, phase: str) -> None:
        self.phase = phase

    # ------------------------------------------------------------------ where in the step
    def where(self) -> str:
        if self.phase == "backward":
            node = torch._C._current_autograd_node()
            if node is not None:
                return f"{node.name()} (backward of {self.node_where.get(id(node), '?')})"
        return self.module_stack[-1] if self.module_stack else ""

    def enter_module(self, module) -> None:
        name = self.module_names.get(id(module))
        if name is not None:
            self.module_stack.append(name)

    def exit_module(self, module) -> None:
        if self.module_names.get(id(module)) is not None and self.module_stack:
            self.module_stack.pop()

    # ------------------------------------------------------------------ cost
    def _cost(self, func, args, kwargs, out) -> None:
        name = func._overloadpacket.__name__
        if self.phase == "build" or name in _FREE_OPS or getattr(func, "is_view", False):
            return
        tensors_in = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        tensors_out = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        nbytes = sum(t.numel() * t.element_size() for t in tensors_in + tensors_out)
        flops = 0.0
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            flops = float(formula(*args, **(kwargs or {}), out_val=out))
        seconds = 0.0
        if self.spec is not None:
            seconds = nbytes / (self.spec.bandwidth_gbs * 1e9)
            if flops:
                dtype = next((t.dtype for t in tensors_in if t.is_floating_point()), torch.float32)
                kind = _KIND_OF_PRODUCT.get(name, "attention" if "attention" in name else "mm")
                seconds = max(seconds, flops / self.spec.peak_flops(dtype, kind))
        cost = self.costs.setdefault((self.phase, name), OpCost())
        cost.calls += 1
        cost.flops += flops
        cost.bytes += nbytes
        cost.seconds += seconds

    # ------------------------------------------------------------------ the mode
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self._op = func._overloadpacket.__name__
        workspace = self.workspaces.get(self._op)
        scratch = []
        if workspace is not None:  # what the card's kernel allocates beside its outputs
            for shape, dtype in workspace(args, kwargs):
                scratch.append(torch.empty(shape, dtype=dtype))
                self._register(scratch[-1], "temporaries")
        try:
            out = func(*args, **kwargs)
        except PlanError:
            raise
        except Exception as error:  # no fake kernel, data-dependent output, ...
            raise PlanError(f"the plan cannot run {func} on tensors without data: "
                            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from error
        kind = self.kind_of_new()
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._register(t, kind)
                if self.phase == "forward" and t.grad_fn is not None:
                    self.node_where[id(t.grad_fn)] = self.where()
        del scratch
        self._cost(func, args, kwargs, out)
        return out
