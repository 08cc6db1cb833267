"""Stage I's student: replace the nn.Linear and nn.Conv2d layers of a model (a diffusers
UNet2DConditionModel first of all) by SVD-initialised low-rank layers (paper 2.2.1), in place.

    report = elr_ext.decompose(unet, rank_ratio=1/3)     # or rank=, energy=, param_budget=
    print(report)                                        # parameters before/after, rank per layer
    elr_ext.save_decomposed(unet, "student/")            # safetensors + the per-layer ranks (JSON)
    unet = elr_ext.load_decomposed(UNet2DConditionModel(**config), "student/")

Rank policies (exactly one; none given means rank_ratio=DEFAULT_RANK_RATIO):
    rank          a fixed rank, clipped to each layer's full rank min(out, in * kh * kw)
    rank_ratio    a fraction of each layer's full rank, rounded half up, at least 1
    energy        per layer, the smallest rank whose singular values keep this share of the squared
                  singular values (the spectral energy, sum s_i^2 = ||W||_F^2)
    param_budget  a total parameter count for the whole model after decomposition, split across
                  layers greedily: every layer starts at rank 1, then the step that buys the most
                  relative energy per parameter is taken while it fits, a step being rank k -> k+1
                  (gain s_k^2 / ||W||_F^2 for (out + in) parameters) or, at the largest rank that
                  still saves parameters, going back to the dense layer (the rest of the energy for
                  the rest of the dense parameters). A step that does not fit freezes that layer.

A layer is decomposed only where it saves parameters: rank * (out + in) must be below
(1 - min_saving) * out * in (min_saving=None decomposes every selected layer whatever it costs; use
it to check that full rank reproduces the model). Grouped convs stay dense. Every layer kept dense is
listed in the report with the reason.

DEFAULT_RANK_RATIO = 1/3: on SD 2.1's UNet it gives 866M -> 365M parameters, so that with the text
encoder and the VAE unchanged the whole model goes 1290M -> 789M, the paper's 1290M -> 790M
(benchmarks/results/decompose_sd21.txt). The same policy takes SD 1.5's UNet 860M -> 361M and
SDXL's 2567M -> 1226M (whole pipelines 1066M -> 568M and 3469M -> 2127M; `benchmarks/decompose.py
--architecture sd15|sd21|sdxl`, benchmarks/results/decompose_<architecture>.txt).

Layers are chosen by type, never by name, so every diffusers UNet layout is handled the same way:
SD 1.x's 1x1 conv proj_in / proj_out, SD 2.x's and SDXL's linear ones, SDXL's multi-layer transformer
blocks and its added text_time embedding (add_embedding.linear_1/2, decomposed like the time
embedding). Each dense layer is released as soon as its low-rank replacement is in place, so the
memory peak is the dense model plus one layer's SVD, not dense and low-rank models side by side.

include / exclude are shell-style patterns (fnmatch, case-sensitive) matched against the whole
qualified module name, e.g. "down_blocks.*", "*.attn2.to_[kv]"; a string or a list of them. Each
pattern must match at least one nn.Linear / nn.Conv2d of the model. Run decompose before attaching
adapters: it replaces plain nn.Linear / nn.Conv2d (exact types) only.

Attention modules of diffusers whose to_q / to_k / to_v became low rank get LowRankAttnProcessor
(q, k, v through one fused lowrank_proj call): every such module, self- and cross-attention of each
layer of each transformer block, whatever the context width (768, 1024, 2048).

Saving: the model keeps its decomposition in `model._elr_decompose_config` (per-layer kind and rank).
save_decomposed writes `model.safetensors` (the state) and `elr_decompose.json` (that config plus,
for a diffusers model, its class and config) into a directory; load_decomposed rebuilds the low-rank
structure on a dense model of the same architecture (or one built from the stored diffusers
config), installs the processors and loads the state strictly. diffusers' save_pretrained /
from_pretrained do not round-trip (from_pretrained builds the dense layers), hence these two.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import heapq
import importlib
import json
import math
import os
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from ._checks import check_choice, check_positive_int
from .nn.attention import LowRankAttnProcessor
from .nn.counting import count_parameters
from .nn.lowrank import SPLITS, LowRankConv2d, LowRankLinear, svd

DEFAULT_RANK_RATIO = 1 / 3
CONFIG_ATTR = "_elr_decompose_config"
CONFIG_FORMAT = "elr-decompose/1"
STATE_FILE = "model.safetensors"
CONFIG_FILE = "elr_decompose.json"

_DENSE_TYPES = (nn.Linear, nn.Conv2d)


@dataclasses.dataclass
class LayerReport:
    """One nn.Linear / nn.Conv2d: its rank after decomposition, or why it stayed dense (rank None)."""
    name: str
    kind: str                     # "linear" or "conv2d"
    shape: tuple                  # the dense weight's shape
    full_rank: int                # min(out, in * kh * kw)
    rank: Optional[int]           # None: kept dense
    params_before: int            # weight + bias
    params_after: int
    rel_error: Optional[float]    # ||W - up @ down||_F / ||W||_F, fp64, of the factors as stored
    reason: Optional[str] = None  # why it stayed dense


@dataclasses.dataclass
class DecomposeReport:
    params_before: int            # every parameter of the model, counted before and after
    params_after: int
    policy: dict                  # the rank policy, split and min_saving used
    layers: List[LayerReport]
    attention_processors: List[str]         # Attention modules now on LowRankAttnProcessor
    attention_skipped: Dict[str, str]       # Attention modules with low-rank q/k/v left as they were

    @property
    def decomposed(self) -> List[LayerReport]:
        return [layer for layer in self.layers if layer.rank is not None]

    @property
    def kept_dense(self) -> List[LayerReport]:
        return [layer for layer in self.layers if layer.rank is None]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        rows = [("layer", "kind", "shape", "rank/full", "params", "rel. error", "note")]
        for l in self.layers:
            rank = f"{l.rank}/{l.full_rank}" if l.rank is not None else f"dense/{l.full_rank}"
            params = f"{l.params_before:,} -> {l.params_after:,}"
            err = f"{l.rel_error:.3e}" if l.rel_error is not None else ""
            rows.append((l.name, l.kind, "x".join(map(str, l.shape)), rank, params, err, l.reason or ""))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        saved = self.params_before - self.params_after
        lines += ["", f"policy: {self.policy}",
                  f"layers: {len(self.decomposed)} decomposed, {len(self.kept_dense)} kept dense; "
                  f"attention processors installed: {len(self.attention_processors)}",
                  f"parameters: {self.params_before:,} -> {self.params_after:,} "
                  f"({saved:,} saved, {100 * saved / max(self.params_before, 1):.1f}%)"]
        lines += [f"attention {name} kept its processor: {why}" for name, why in self.attention_skipped.items()]
        return "\n".join(lines)


def _kind(module: nn.Module) -> str:
    return "linear" if isinstance(module, nn.Linear) else "conv2d"


def _as_patterns(name: str, value) -> Optional[List[str]]:
    if value is None:
        return None
    patterns = [value] if isinstance(value, str) else list(value)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"{name} must be a non-empty pattern string or a list of them, got {value!r}")
    return patterns


def _resolve_policy(rank, rank_ratio, energy, param_budget) -> dict:
    given = {k: v for k, v in (("rank", rank), ("rank_ratio", rank_ratio), ("energy", energy),
                               ("param_budget", param_budget)) if v is not None}
    if len(given) > 1:
        raise ValueError(f"conflicting rank policies {given}: give exactly one of rank, rank_ratio, energy, "
                         f"param_budget (none means rank_ratio={DEFAULT_RANK_RATIO:.4g})")
    if not given:
        return {"rank_ratio": DEFAULT_RANK_RATIO}
    (key, value), = given.items()
    if key in ("rank", "param_budget"):
        check_positive_int(key, value)
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{key} must be a number in (0, 1], got {value!r}")
    return {key: value}


def _max_saving_rank(out: int, inp: int, full: int, min_saving: Optional[float]) -> int:
    """The largest rank whose factors keep rank * (out + in) below (1 - min_saving) * out * in
    (0 when no rank does); `full` when min_saving is None."""
    if min_saving is None:
        return full
    bound = (1 - min_saving) * out * inp
    k = min(full, math.floor(bound / (out + inp)))
    while k >= 1 and not k * (out + inp) < bound:
        k -= 1
    return max(k, 0)


def _energy_rank(S: torch.Tensor, energy: float) -> int:
    sq = S.double().square()
    if sq.sum() == 0:
        return 1
    share = sq.cumsum(0) / sq.sum()
    return min(int(torch.searchsorted(share, torch.tensor([energy], dtype=share.dtype)).item()) + 1, S.numel())


def _budget_ranks(spectra: Dict[str, torch.Tensor], dims: Dict[str, tuple], k_save: Dict[str, int],
                  fixed: int, budget: int) -> Dict[str, Optional[int]]:
    """param_budget: the greedy split described in the module docstring. Returns a rank per layer
    (None: back to dense)."""
    minimum = fixed + sum(out + inp for out, inp in dims.values())
    if budget < minimum:
        raise ValueError(f"param_budget={budget:,} is below the smallest reachable total {minimum:,} "
                         f"(rank 1 everywhere decomposable, the rest dense)")
    left = budget - minimum
    ranks: Dict[str, Optional[int]] = {name: 1 for name in dims}
    energies = {name: S.double().square() for name, S in spectra.items()}
    totals = {name: float(e.sum()) or 1.0 for name, e in energies.items()}

    def next_step(name):  # (negative gain per parameter, cost, name, new rank) of this layer's next step
        out, inp = dims[name]
        k = ranks[name]
        if k < k_save[name]:
            return (-float(energies[name][k]) / totals[name] / (out + inp), out + inp, name, k + 1)
        tail = float(energies[name][k:].sum()) / totals[name]
        return (-tail / (out * inp - k * (out + inp)), out * inp - k * (out + inp), name, None)

    heap = [next_step(name) for name in dims]
    heapq.heapify(heap)
    while heap:
        _, cost, name, new_rank = heapq.heappop(heap)
        if cost > left:
            continue  # this layer's next step does not fit: it stays where it is
        left -= cost
        ranks[name] = new_rank
        if new_rank is not None:
            heapq.heappush(heap, next_step(name))
    return ranks


def _relative_error(weight: torch.Tensor, module: nn.Module) -> Optional[float]:
    """None for a weight without data (a fake tensor of elr_ext.plan): there is no error to measure."""
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(weight):
        return None
    w = weight.detach().to("cpu", torch.float64).flatten(1)
    approx = module.up.detach().to("cpu", torch.float64).flatten(1) @ module.down.detach().to("cpu", torch.float64).flatten(1)
    norm = torch.linalg.matrix_norm(w).item()
    return torch.linalg.matrix_norm(w - approx).item() / norm if norm > 0 else 0.0


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, new)


def _low_rank_from(dense: nn.Module, rank: int, split: str, factors) -> nn.Module:
    if isinstance(dense, nn.Linear):
        return LowRankLinear.from_linear(dense, rank, split, factors=factors)
    return LowRankConv2d.from_conv(dense, rank, split, factors=factors)


def install_attention_processors(model: nn.Module):
    """Put LowRankAttnProcessor on every diffusers Attention of `model` whose to_q / to_k / to_v
    include a LowRankLinear. Returns (names installed, {name: why skipped})."""
    try:
        from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
    except ImportError:  # no diffusers: no diffusers attention to wire
        return [], {}
    installed, skipped = [], {}
    for name, attn in model.named_modules():
        if not isinstance(attn, Attention):
            continue
        if not any(isinstance(getattr(attn, p, None), LowRankLinear) for p in ("to_q", "to_k", "to_v")):
            continue
        processor = type(attn.processor)
        if getattr(attn, "added_kv_proj_dim", None) is not None or getattr(attn, "fused_projections", False):
            skipped[name] = "added or fused k/v projections"
        elif processor not in (AttnProcessor, AttnProcessor2_0, LowRankAttnProcessor):
            skipped[name] = f"custom processor {processor.__name__}"
        else:
            attn.set_processor(LowRankAttnProcessor())
            installed.append(name)
    return installed, skipped


def decompose(model: nn.Module, rank: Optional[int] = None, rank_ratio: Optional[float] = None,
              energy: Optional[float] = None, param_budget: Optional[int] = None,
              include: Union[str, Sequence[str], None] = None, exclude: Union[str, Sequence[str], None] = None,
              split: str = "us", min_saving: Optional[float] = 0.0,
              svd_dtype: torch.dtype = torch.float64) -> DecomposeReport:
    """Replace nn.Linear / nn.Conv2d layers of `model` in place by LowRankLinear / LowRankConv2d
    initialised by truncated SVD (computed in `svd_dtype` on the CPU, cast to each layer's dtype and
    device), wire LowRankAttnProcessor on diffusers attention, and return the report. Policies,
    patterns and min_saving are described in the module docstring."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    policy = _resolve_policy(rank, rank_ratio, energy, param_budget)
    check_choice("split", split, SPLITS)
    if min_saving is not None and (isinstance(min_saving, bool) or not isinstance(min_saving, (int, float))
                                   or not -1 <= min_saving < 1):
        raise ValueError(f"min_saving must be None or a number in [-1, 1), got {min_saving!r}")
    check_choice("svd_dtype", svd_dtype, (torch.float32, torch.float64))
    include_p, exclude_p = _as_patterns("include", include), _as_patterns("exclude", exclude)

    layers = [(name, m) for name, m in model.named_modules() if type(m) in _DENSE_TYPES and name]
    for arg, patterns in (("include", include_p), ("exclude", exclude_p)):
        for p in patterns or ():
            if not any(fnmatch.fnmatchcase(name, p) for name, _ in layers):
                raise ValueError(f"{arg} pattern {p!r} matches no nn.Linear / nn.Conv2d of the model")

    params_before = count_parameters(model)
    reports: Dict[str, LayerReport] = {}
    todo = {}  # name -> (module, out, in, full rank, largest rank that saves)
    for name, m in layers:
        out, inp = m.weight.shape[0], m.weight[0].numel()
        full = min(out, inp)
        dense = LayerReport(name, _kind(m), tuple(m.weight.shape), full, None, sum(p.numel() for p in m.parameters()),
                            sum(p.numel() for p in m.parameters()), None)
        reports[name] = dense
        if include_p is not None and not any(fnmatch.fnmatchcase(name, p) for p in include_p):
            dense.reason = "not matched by include"
        elif exclude_p is not None and any(fnmatch.fnmatchcase(name, p) for p in exclude_p):
            dense.reason = "matched by exclude"
        elif isinstance(m, nn.Conv2d) and m.groups != 1:
            dense.reason = f"grouped conv (groups={m.groups})"
        else:
            k_save = _max_saving_rank(out, inp, full, min_saving)
            if k_save < 1:
                dense.reason = "no rank saves parameters" + ("" if not min_saving else f" beyond min_saving={min_saving}")
            else:
                todo[name] = (m, out, inp, full, k_save)

    budget_ranks = None
    if "param_budget" in policy:  # global: every spectrum first (singular values only), then the split
        spectra = {name: torch.linalg.svdvals(m.weight.detach().to("cpu", svd_dtype).flatten(1))
                   for name, (m, *_) in todo.items()}
        fixed = params_before - sum(out * inp for _, out, inp, _, _ in todo.values())
        budget_ranks = _budget_ranks(spectra, {n: (o, i) for n, (_, o, i, _, _) in todo.items()},
                                     {n: t[4] for n, t in todo.items()}, fixed, policy["param_budget"])
        del spectra

    del layers  # from here on only `todo` refers to the dense layers, and it lets go of each in turn
    chosen = {}
    for name in list(todo):  # one layer at a time: one SVD in memory, each dense layer freed once replaced
        m, out, inp, full, k_save = todo.pop(name)
        factors = None
        if budget_ranks is not None:
            k = budget_ranks[name]
            if k is None:
                reports[name].reason = "param_budget leaves it dense"
                continue
        elif "rank" in policy:
            k = min(policy["rank"], full)
        elif "rank_ratio" in policy:
            k = max(1, math.floor(policy["rank_ratio"] * full + 0.5))
        else:
            factors = svd(m.weight.flatten(1), svd_dtype)
            k = _energy_rank(factors[1], policy["energy"])
        if k > k_save:
            reports[name].reason = (f"rank {k} would not save parameters ({k * (out + inp):,} >= {out * inp:,})"
                                    if not min_saving else f"rank {k} saves less than min_saving={min_saving}")
            continue
        if factors is None:
            factors = svd(m.weight.flatten(1), svd_dtype)
        low = _low_rank_from(m, k, split, factors)
        del factors
        _replace(model, name, low)
        r = reports[name]
        r.rank, r.params_after, r.rel_error = k, sum(p.numel() for p in low.parameters()), _relative_error(m.weight, low)
        chosen[name] = {"kind": r.kind, "rank": k}
        del m, low  # the model no longer holds the dense layer: its weight goes now, not at the end

    installed, skipped = install_attention_processors(model)
    config = getattr(model, CONFIG_ATTR, None) or {"format": CONFIG_FORMAT, "layers": {}}
    config["layers"].update(chosen)
    config.update(split=split, policy=policy)
    setattr(model, CONFIG_ATTR, config)

    return DecomposeReport(params_before, count_parameters(model),
                           {**policy, "split": split, "min_saving": min_saving,
                            "svd_dtype": str(svd_dtype).replace("torch.", "")},
                           list(reports.values()), installed, skipped)


def apply_decomposition_config(model: nn.Module, config: dict) -> nn.Module:
    """Give a dense model the low-rank structure `config` describes (model._elr_decompose_config of
    a decomposed model), with uninitialised-from-SVD factors (load a state afterwards), and install
    the attention processors. No SVD runs."""
    if not isinstance(config, dict) or config.get("format") != CONFIG_FORMAT:
        raise ValueError(f"config is not an elr-ext decomposition config (format {CONFIG_FORMAT})")
    for name, entry in config["layers"].items():
        try:
            dense = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"config names layer {name!r}, which the model does not have") from None
        expected = nn.Linear if entry["kind"] == "linear" else nn.Conv2d
        if type(dense) is not expected:
            raise ValueError(f"layer {name!r} is a {type(dense).__name__}; the config expects a dense "
                             f"{expected.__name__} to decompose")
        kw = {"device": dense.weight.device, "dtype": dense.weight.dtype}
        if expected is nn.Linear:
            low = LowRankLinear(dense.in_features, dense.out_features, entry["rank"], dense.bias is not None, **kw)
        else:
            low = LowRankConv2d(dense.in_channels, dense.out_channels, dense.kernel_size, entry["rank"], dense.stride,
                                dense.padding, dense.dilation, dense.bias is not None, dense.padding_mode, **kw)
        low.train(dense.training)
        _replace(model, name, low)
    install_attention_processors(model)
    setattr(model, CONFIG_ATTR, json.loads(json.dumps(config)))
    return model


def save_decomposed(model: nn.Module, path: str) -> None:
    """Write a decomposed model into directory `path`: model.safetensors (the whole state) and
    elr_decompose.json (the per-layer ranks; for a diffusers model also its class and config)."""
    from safetensors.torch import save_model

    config = getattr(model, CONFIG_ATTR, None)
    if config is None:
        raise ValueError("model has no decomposition config: run elr_ext.decompose on it first")
    meta = {"decompose": config}
    if hasattr(model, "to_json_string") and hasattr(type(model), "from_config"):  # diffusers ConfigMixin
        cls = type(model)
        meta.update(model_class=f"{cls.__module__}:{cls.__qualname__}", model_config=json.loads(model.to_json_string()))
    os.makedirs(path, exist_ok=True)
    state_file, config_file = os.path.join(path, STATE_FILE), os.path.join(path, CONFIG_FILE)
    save_model(model, state_file + ".tmp")  # handles shared tensors; renamed once complete
    os.replace(state_file + ".tmp", state_file)
    with open(config_file + ".tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(config_file + ".tmp", config_file)


def load_decomposed(model_or_config, path: str) -> nn.Module:
    """Rebuild a model saved by save_decomposed. `model_or_config`: a dense model of the same
    architecture (changed in place and returned), a diffusers config dict, or None to use the
    diffusers config stored in `path`. The state is loaded strictly."""
    from safetensors.torch import load_model

    with open(os.path.join(path, CONFIG_FILE)) as f:
        meta = json.load(f)
    if isinstance(model_or_config, nn.Module):
        model = model_or_config
    else:
        config = model_or_config if model_or_config is not None else meta.get("model_config")
        if not isinstance(config, dict) or "model_class" not in meta:
            raise ValueError("model_or_config: pass the dense model (no diffusers class/config is stored in "
                             f"{path}) or a config dict")
        module_name, _, qualname = meta["model_class"].partition(":")
        cls = importlib.import_module(module_name)
        for part in qualname.split("."):
            cls = getattr(cls, part)
        model = cls.from_config(config)
    apply_decomposition_config(model, meta["decompose"])
    load_model(model, os.path.join(path, STATE_FILE), strict=True)
    return model
