"""Benchmark of one Stage II training step: Uni-ControlNet-style baseline against ELR Stage II, and
each of ELR's three savings alone, on the same backbone, batch and resolution (paper Table 2).

Arms (ARMS below):
  baseline     adapter="full" (a trainable copy of the encoder and middle block, Uni-ControlNet's
               local adapter), FDN in eager PyTorch (group_norm, mul, add), dense backbone
  kron         Kronecker updates on a frozen copy (adapter="kron"), eager FDN, dense backbone
  fused-fdn    adapter="full", the fused FDN op (elr_ext.fdn), dense backbone
  decomposed   adapter="full", eager FDN, backbone decomposed by elr_ext.decompose (the adapter's copy
               inherits the low-rank format, paper 2.4)
  elr          adapter="kron", fused FDN, decomposed backbone: ELR Stage II

One step = adapter forward, frozen UNet forward with the adapter's residuals, MSE on the noise,
backward, AdamW step, zero_grad. The text embeddings, noisy latents, timesteps and condition are
fixed random tensors made once (the frozen text encoder and VAE cost the same in every arm and are
often cached in training). Weights are fp32; on a GPU the step runs under autocast (--dtype).

Measured for each arm:
  trainable / total parameters (unique tensors; total = backbone + adapter)
  peak memory: one fresh process per arm. GPU: max_memory_allocated over the measured steps minus
    what the inputs took (it includes weights, gradients, optimizer states, activations). CPU: peak
    RSS (VmHWM) over the measured steps minus the RSS before the model was built, with glibc's mmap
    threshold fixed so freed tensors go back to the OS (benchmarks/harness.py).
  s/it: median over timed steps after warm-up. --timing interleaved: all arms in one process, timed
    A B C D E A B C ... (benchmarks/harness.time_arms); --timing fresh: each arm in its own fresh
    process per round, rounds interleaved, the median of the rounds' medians (for shapes where five
    arms do not fit in memory together).
  ratios against the baseline, and the targets: trainable <= 0.42x, memory <= 0.55x, s/it <= 0.38x.

    python benchmarks/train_step.py --quick                         # tiny config, smoke run
    python benchmarks/train_step.py                                 # tiny config on the CPU
    python benchmarks/train_step.py --config sd21 --batch 1 --latent 32   # SD 2.1 shapes, CPU-reduced
    python benchmarks/train_step.py --config sd21 --batch 1 2 4     # SD 2.1 shapes at 512 px on a GPU
    python benchmarks/train_step.py --simulate --config sdxl --batch 1 --plan-device rtx4090-24gb
                                                                    # planned: SDXL at 1024 px (sd15: 512 px)

Timings are only meaningful on an otherwise idle machine; parameter counts are exact anywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))
import elr_ext  # noqa: E402
from elr_ext.nn import count_parameters  # noqa: E402
from elr_ext.architectures import ARCHITECTURES  # noqa: E402
from elr_ext.plan import PLAN_TRIES  # noqa: E402
from elr_training.config import PRESETS  # noqa: E402
from elr_training.data.conditions import condition_channels  # noqa: E402  (the training app's channel counts)

STAGE1_RANK_RATIO = PRESETS["paper"][1]["rank_ratio"]  # the decomposition train.py's Stage I makes by default


@dataclasses.dataclass(frozen=True)
class Arm:
    adapter: str  # "full" or "kron"
    fused_fdn: bool
    decomposed: bool
    label: str


ARMS = {
    "baseline": Arm("full", False, False, "Uni-ControlNet-style baseline"),
    "kron": Arm("kron", False, False, "Kronecker updates only"),
    "fused-fdn": Arm("full", True, False, "fused FDN only"),
    "decomposed": Arm("full", False, True, "decomposed backbone only"),
    "elr": Arm("kron", True, True, "ELR Stage II (all three)"),
}
BASELINE, OURS = "baseline", "elr"
TARGETS = {"trainable_params": 0.42, "peak_memory_bytes": 0.55, "seconds_per_iteration": 0.38}
PAPER = {"trainable_params": 750 / 1271, "peak_memory_bytes": 14 / 20, "seconds_per_iteration": 2.15 / 5.72}

@dataclasses.dataclass
class StepConfig:
    """The model and shapes of one benchmark configuration (all arms share it)."""

    name: str = "tiny"  # "tiny": elr_ext.tiny (pixel space); "sd15", "sd21", "sdxl": the family's UNet shapes
    batch: int = 2
    latent: int = 32  # side of the UNet's input (latents for the SD families, pixels for tiny)
    condition_types: tuple = ("canny",)
    text_tokens: int = 77
    terms: int = 4
    rank: int = 8
    rank_ratio: float = STAGE1_RANK_RATIO  # elr_ext.decompose: rank = rank_ratio * min(out, in) per layer
    lr: float = 1e-5
    gradient_checkpointing: bool = False  # the frozen UNet's blocks and the adapter's copied blocks, every arm

    @property
    def condition_scale(self) -> int:
        """Condition side / UNet input side: SD's VAE downsamples 8x, the tiny config is pixel space."""
        return 1 if self.name == "tiny" else ARCHITECTURES[self.name].latent_factor

    @property
    def condition_channels(self) -> int:
        return condition_channels(self.condition_types)

    @property
    def condition_channel_list(self) -> list:
        return [condition_channels([t]) for t in self.condition_types]

    def describe(self) -> str:
        side = self.latent * self.condition_scale
        space = f"{side}x{side} px" if self.name == "tiny" else f"latents {self.latent}x{self.latent} ({side} px)"
        return (f"{self.name}, batch {self.batch}, {space}, condition {'+'.join(self.condition_types)}"
                + (", gradient checkpointing" if self.gradient_checkpointing else ""))


def build_unet(cfg: StepConfig) -> nn.Module:
    if cfg.name == "tiny":
        from elr_ext.tiny import tiny_unet

        return tiny_unet(sample_size=cfg.latent)
    if cfg.name in ARCHITECTURES:
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel(**{**ARCHITECTURES[cfg.name].unet, "sample_size": cfg.latent})  # random weights
    raise ValueError(f"--config must be tiny or one of {sorted(ARCHITECTURES)}, got {cfg.name!r}")


def set_fdn_mode(adapter: nn.Module, fused: bool) -> int:
    """Run every FDN of the adapter fused (elr_ext.fdn) or in eager PyTorch (reference.fdn_eager:
    group_norm, mul, add, silu as Uni-ControlNet writes it); returns how many FDN blocks were set."""
    from elr_ext.nn.control_adapter import FDNResnetBlock

    blocks = [m for m in adapter.modules() if isinstance(m, FDNResnetBlock)]
    for block in blocks:
        block.fused = fused
    return len(blocks)


def save_backbones(cfg: StepConfig, decomposed: bool, folder: str) -> None:
    """Build the dense backbone (and its decomposition) once and save them under `folder`: every
    fresh process then loads them instead of initialising 865M weights and running an SVD per
    layer again (minutes at SD 2.1's shapes), and all arms share exactly the same weights."""
    dense, low_rank = os.path.join(folder, "dense"), os.path.join(folder, "decomposed")
    marker, built_for = os.path.join(folder, "built_for.json"), {"config": cfg.name, "rank_ratio": cfg.rank_ratio}
    if os.path.isfile(marker):
        with open(marker) as f:
            found = json.load(f)
        if found != built_for:
            raise ValueError(f"--backbones {folder} holds backbones built for {found}, not {built_for}; "
                             "point --backbones at another folder")
        if os.path.isdir(dense) and (os.path.isdir(low_rank) or not decomposed):
            print(f"backbones: reusing {folder}", flush=True)
            return
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(0)
    unet = build_unet(cfg)
    unet.save_pretrained(dense, safe_serialization=True)
    if decomposed:
        start = time.perf_counter()
        # the SVD in fp32: the factors' values do not change a step's cost, and fp64 is ~2x slower
        elr_ext.decompose(unet, rank_ratio=cfg.rank_ratio, svd_dtype=torch.float32)
        print(f"backbones: decomposed in {time.perf_counter() - start:.0f} s", flush=True)
        elr_ext.save_decomposed(unet, low_rank)
    with open(marker, "w") as f:  # written last: a folder without it is rebuilt
        json.dump(built_for, f)
    del unet
    gc.collect()


def load_backbone(cfg: StepConfig, decomposed: bool, folder: Optional[str]) -> nn.Module:
    """The backbone saved by save_backbones, or built here (seeded) without a folder."""
    if folder is None:
        torch.manual_seed(0)
        unet = build_unet(cfg)
        if decomposed:
            elr_ext.decompose(unet, rank_ratio=cfg.rank_ratio, svd_dtype=torch.float32)
        return unet
    if decomposed:
        return elr_ext.load_decomposed(None, os.path.join(folder, "decomposed"))
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(os.path.join(folder, "dense"))


def build_arm(cfg: StepConfig, arm: Arm, device: torch.device, backbones: Optional[str] = None):
    """(unet, adapter, optimizer) of one arm, weights fp32 on `device`, the same backbone weights in
    every arm (`backbones`: the folder save_backbones wrote)."""
    from elr_ext.nn.control_adapter import LocalControlAdapter

    unet = load_backbone(cfg, arm.decomposed, backbones)
    unet.requires_grad_(False)
    torch.manual_seed(0)  # the adapter's new parts
    adapter = LocalControlAdapter.from_unet(unet, condition_channels=cfg.condition_channel_list, adapter=arm.adapter,
                                            terms=cfg.terms, rank=cfg.rank, latent_factor=cfg.condition_scale)
    if set_fdn_mode(adapter, arm.fused_fdn) == 0:
        raise RuntimeError("the adapter holds no FDN block: nothing to run fused or eager")
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        adapter.enable_gradient_checkpointing()
    unet.to(device)
    adapter.to(device).train()
    optimizer = torch.optim.AdamW(list(adapter.trainable_parameters()), lr=cfg.lr)
    return unet, adapter, optimizer


def make_inputs(cfg: StepConfig, unet_config, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(1)
    b, side = cfg.batch, cfg.latent
    cond_side = side * cfg.condition_scale
    tensors = {
        "sample": torch.randn(b, unet_config.in_channels, side, side, generator=g),
        "noise": torch.randn(b, unet_config.out_channels, side, side, generator=g),
        "timesteps": torch.randint(0, 1000, (b,), generator=g),
        "encoder_hidden_states": torch.randn(b, cfg.text_tokens, unet_config.cross_attention_dim, generator=g),
        "condition": (torch.rand(b, cfg.condition_channels, cond_side, cond_side, generator=g) > 0.9).float(),
    }
    if getattr(unet_config, "addition_embed_type", None) == "text_time":  # SDXL: pooled text and time ids
        pooled = unet_config.projection_class_embeddings_input_dim - 6 * unet_config.addition_time_embed_dim
        tensors["text_embeds"] = torch.randn(b, pooled, generator=g)
        tensors["time_ids"] = torch.tensor([[cond_side, cond_side, 0, 0, cond_side, cond_side]] * b,
                                           dtype=torch.float32)
    return {k: v.to(device) for k, v in tensors.items()}


def predict(unet, adapter, inputs: dict) -> torch.Tensor:
    """The adapter's residuals into the frozen UNet: its noise prediction for the fixed inputs."""
    added = {k: inputs[k] for k in ("text_embeds", "time_ids")} if "time_ids" in inputs else None
    down, mid = adapter(inputs["sample"], inputs["timesteps"], inputs["encoder_hidden_states"], inputs["condition"],
                        added_cond_kwargs=added)
    return unet(inputs["sample"], inputs["timesteps"], encoder_hidden_states=inputs["encoder_hidden_states"],
                added_cond_kwargs=added, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample


def make_step(unet, adapter, optimizer, inputs: dict, autocast_dtype: Optional[torch.dtype]):
    device_type = inputs["sample"].device.type

    def step() -> None:
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            pred = predict(unet, adapter, inputs)
        loss = F.mse_loss(pred.float(), inputs["noise"].float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def _unet_config(cfg: StepConfig):
    """The UNet config without building the UNet (for the inputs' shapes)."""
    if cfg.name == "tiny":
        from elr_ext.tiny import TINY_UNET_CONFIG

        conf = dict(TINY_UNET_CONFIG)
    else:
        conf = dict(ARCHITECTURES[cfg.name].unet)
    return argparse.Namespace(**{"addition_embed_type": None, **conf})


# ----------------------------------------------------------------------------------------------
# One arm in a fresh process (the --child mode): prints one JSON line


def child(cfg: StepConfig, arm_name: str, job: str, device: torch.device, autocast_dtype, warmup: int,
          steps: int, backbones: Optional[str], plan_device: str = "cpu") -> dict:
    arm = ARMS[arm_name]
    if job == "plan":
        return plan_arm(cfg, arm_name, plan_device, autocast_dtype)
    if job == "params":  # exact counts only: no step, no warm-up
        unet, adapter, _ = build_arm(cfg, arm, device, backbones)
        return {"arm": arm_name, "job": job, **parameter_counts(unet, adapter)}
    # Warm the process up with the same arm on the tiny config: the lazy imports and the first-call
    # initialisations (autograd engine, kernels, allocator pools) cost the same in every arm and are
    # not training memory; they must happen before the RSS the peak is measured against.
    small = dataclasses.replace(cfg, name="tiny", batch=1, latent=16)
    unet, adapter, optimizer = build_arm(small, arm, device)
    make_step(unet, adapter, optimizer, make_inputs(small, _unet_config(small), device), autocast_dtype)()
    del unet, adapter, optimizer
    gc.collect()
    inputs = make_inputs(cfg, _unet_config(cfg), device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = harness.process_memory_bytes()[1]
    unet, adapter, optimizer = build_arm(cfg, arm, device, backbones)
    step = make_step(unet, adapter, optimizer, inputs, autocast_dtype)
    for _ in range(warmup):  # the first step also allocates the optimizer's states
        step()
    out = {"arm": arm_name, "job": job}
    if job == "time":
        samples = []
        for _ in range(steps):
            harness._sync(device)
            start = time.perf_counter()
            step()
            harness._sync(device)
            samples.append(time.perf_counter() - start)
        out["seconds"] = statistics.median(samples)
        out["samples"] = samples
        return out
    # job == "memory": the peak over the measured steps, on top of what the process held before the
    # model was built (so the build's temporaries, e.g. the dense weights decompose replaces, are not counted)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            step()
        torch.cuda.synchronize(device)
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device) - before
        out["peak_total_bytes"] = torch.cuda.max_memory_allocated(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current RSS (weights, optimizer states): the build's peak is forgotten
        for _ in range(steps):
            step()
        peak, _ = harness.process_memory_bytes()
        out["peak_memory_bytes"] = peak - before
        out["peak_total_bytes"] = peak
    out.update(parameter_counts(unet, adapter))
    return out


def plan_arm(cfg: StepConfig, arm_name: str, plan_device: str, autocast_dtype) -> dict:
    """One arm's step planned by elr_ext.plan on tensors without data: the same build and step as the
    measured arms, on `plan_device` (a card of elr_ext.plan.DEVICES, or cpu)."""
    from elr_ext.plan import PlannedStep, plan_step

    def build():
        unet, adapter, optimizer = build_arm(cfg, ARMS[arm_name], torch.device("cpu"))
        if plan_device != "cpu":
            for group in optimizer.param_groups:
                group["foreach"] = True  # what torch.optim picks for CUDA tensors
        inputs = make_inputs(cfg, _unet_config(cfg), torch.device("cpu"))

        def loss():
            return F.mse_loss(predict(unet, adapter, inputs).float(), inputs["noise"].float())

        return PlannedStep({"unet": unet, "adapter": adapter}, loss, optimizer)

    plan = plan_step(build, device=plan_device, autocast_dtype=autocast_dtype, description=f"{arm_name}: {cfg.describe()}")
    print(plan.format(), file=sys.stderr)
    return {"arm": arm_name, "job": "plan", "peak_memory_bytes": plan.peak_bytes, "peak": plan.to_dict()["peak"],
            "flops": plan.flops, "seconds_per_iteration": plan.seconds, "fits": plan.fits,
            "trainable_params": plan.trainable_params, "total_params": plan.total_params,
            "seconds_to_plan": plan.seconds_to_plan}


def parameter_counts(unet, adapter) -> dict:
    return {"trainable_params": count_parameters(adapter.trainable_parameters()),
            "adapter_params": count_parameters(adapter),
            "backbone_params": count_parameters(unet),
            "total_params": count_parameters(unet, adapter)}


def _child_args(args, arm: str, job: str, batch: int) -> List[str]:
    return [os.path.abspath(__file__), "--child", arm, "--job", job] + \
        (["--backbones", args.backbones] if args.backbones else []) + [
            "--config", args.config, "--batch", str(batch),
            "--latent", str(args.latent), "--device", args.device, "--warmup", str(args.warmup),
            "--steps", str(args.steps), "--conditions", ",".join(args.conditions), "--rank", str(args.rank),
            "--terms", str(args.terms), "--rank-ratio", str(args.rank_ratio)] + \
        (["--dtype", args.dtype] if args.dtype else []) + \
        (["--gradient-checkpointing"] if args.gradient_checkpointing else []) + \
        (["--simulate", "--plan-device", args.plan_device] if args.simulate else [])


# ----------------------------------------------------------------------------------------------
# The parent: every arm, ratios, targets, files


def time_interleaved(cfg: StepConfig, arms: List[str], device, autocast_dtype, repeats: int,
                     backbones: str) -> dict:
    """All arms in this process, timed A B C ... A B C ... by the harness (median of `repeats`)."""
    fns = {}
    for name in arms:
        unet, adapter, optimizer = build_arm(cfg, ARMS[name], device, backbones)
        fns[name] = make_step(unet, adapter, optimizer, make_inputs(cfg, unet.config, device), autocast_dtype)
    return harness.time_arms(fns, device, repeats=repeats, min_sample_s=0.0)


def time_fresh(args, arms: List[str], batch: int, rounds: int) -> dict:
    """Each arm in a fresh process per round, rounds interleaved; the median of the rounds' medians."""
    per_arm: Dict[str, list] = {a: [] for a in arms}
    for _ in range(rounds):
        for arm in arms:
            res = harness.run_fresh(_child_args(args, arm, "time", batch))
            if res:
                per_arm[arm].append(res["seconds"])
    return {a: statistics.median(v) for a, v in per_arm.items() if v}


def measure_memory(args, arms: List[str], batch: int, jobs: int, job: str = "memory") -> dict:
    """Peak memory and parameter counts (job "params": the counts alone), one fresh process per arm
    (processes may run side by side: a process's peak RSS is its own)."""
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        results = list(pool.map(lambda a: harness.run_fresh(_child_args(args, a, job, batch), memory=True), arms))
    return {a: r for a, r in zip(arms, results)}


def summarise(rows: List[dict]) -> None:
    """Add the ratios against the baseline and the target verdicts to the rows (in place)."""
    base = next((r for r in rows if r["arm"] == BASELINE), None)
    for row in rows:
        row["ratios"] = {}
        for key in TARGETS:
            value, ref = row.get(key), base and base.get(key)
            row["ratios"][key] = value / ref if value is not None and ref else None
        if row["arm"] == OURS:
            row["targets"] = {k: {"target": t, "ratio": row["ratios"][k], "paper": PAPER[k],
                                  "met": None if row["ratios"][k] is None else row["ratios"][k] <= t}
                              for k, t in TARGETS.items()}


def format_table(result: dict) -> str:
    lines = [f"train_step on {result['device']} ({result['precision']}, torch {result['torch']}); "
             f"{result['config_description']}; timing: {result['timing']}",
             f"ratios are arm / baseline (lower is better); targets for elr: trainable <= "
             f"{TARGETS['trainable_params']}x, memory <= {TARGETS['peak_memory_bytes']}x, s/it <= "
             f"{TARGETS['seconds_per_iteration']}x"]
    header = (f"{'arm':12s} {'description':32s} {'trainable':>12s} {'total':>13s} {'peak MiB':>10s} {'s/it':>9s} "
              f"{'train x':>8s} {'mem x':>7s} {'s/it x':>7s}")
    lines += [header, "-" * len(header)]
    for r in result["rows"]:
        def num(key, fmt):
            v = r.get(key)
            return "-" if v is None else format(v, fmt)

        def ratio(key):
            v = r["ratios"].get(key)
            return "-" if v is None else f"{v:.3f}"

        mem = r.get("peak_memory_bytes")
        lines.append(f"{r['arm']:12s} {ARMS[r['arm']].label:32s} {num('trainable_params', ',d'):>12s} "
                     f"{num('total_params', ',d'):>13s} {'-' if mem is None else f'{mem / 2**20:.1f}':>10s} "
                     f"{num('seconds_per_iteration', '.4f'):>9s} {ratio('trainable_params'):>8s} "
                     f"{ratio('peak_memory_bytes'):>7s} {ratio('seconds_per_iteration'):>7s}")
    ours = next((r for r in result["rows"] if r["arm"] == OURS and "targets" in r), None)
    if ours:
        for key, t in ours["targets"].items():
            verdict = "not measured" if t["met"] is None else ("met" if t["met"] else "NOT met")
            got = "-" if t["ratio"] is None else f"{t['ratio']:.3f}x"
            lines.append(f"target {key}: {got} vs <= {t['target']}x -> {verdict} (paper Table 2: {t['paper']:.3f}x)")
    return "\n".join(lines)


def write_results(stem: str, result: dict, table: str) -> None:
    """<stem>.json, .txt and .png, each written whole or not at all."""
    for suffix, text in ((".json", json.dumps(result, indent=1)), (".txt", table + "\n")):
        with open(stem + suffix + ".tmp", "w") as f:
            f.write(text)
        os.replace(stem + suffix + ".tmp", stem + suffix)
    plot(result, stem + ".png")
    print(f"wrote {stem}.json, .txt and .png")


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(TARGETS)
    names = {"trainable_params": "trainable params", "peak_memory_bytes": "peak memory", "seconds_per_iteration": "s/it"}
    rows = [r for r in result["rows"] if r["arm"] != BASELINE]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        values = [row["ratios"].get(k) or 0 for k in keys]
        ax.bar([j + i * width for j in range(len(keys))], values, width, label=ARMS[row["arm"]].label)
    for j, k in enumerate(keys):
        ax.hlines(TARGETS[k], j - width / 2, j + 0.8 - width / 2, colors="red", linestyles="dashed",
                  label="target (elr)" if j == 0 else None)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
    ax.set_xticklabels([names[k] for k in keys])
    ax.set_ylabel("ratio to the Uni-ControlNet-style baseline")
    ax.set_title(f"train_step: {result['config_description']}\n{result['device']}, {result['precision']}", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny", choices=("tiny", *ARCHITECTURES))
    p.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default: tiny 2; sd21 1 on the "
                   "CPU, 1 2 4 on a GPU)")
    p.add_argument("--latent", type=int, default=None, help="UNet input side (default: tiny 32; sd21 64 on a GPU "
                   "= 512 px, 32 on the CPU = 256 px)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="autocast dtype on a GPU (default bfloat16); the CPU runs fp32")
    p.add_argument("--conditions", type=lambda s: s.split(","), default=["canny"], help="condition types, e.g. canny,seg")
    p.add_argument("--arms", type=lambda s: s.split(","), default=list(ARMS), help=f"subset of {','.join(ARMS)}")
    p.add_argument("--timing", choices=("interleaved", "fresh"), default=None,
                   help="default: interleaved for tiny, fresh for sd21 (five SD arms do not fit side by side)")
    p.add_argument("--repeats", type=int, default=15, help="timed steps per arm (interleaved) / per process (fresh)")
    p.add_argument("--rounds", type=int, default=3, help="--timing fresh: processes per arm, interleaved")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="measured steps per child process (default: --repeats)")
    p.add_argument("--memory-jobs", type=int, default=1, help="memory processes run side by side")
    p.add_argument("--terms", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rank-ratio", type=float, default=STAGE1_RANK_RATIO, help="decompose's rank ratio (train.py's "
                   "Stage I default)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="every arm with gradient checkpointing of "
                   "the frozen UNet and the adapter (results *_ckpt)")
    p.add_argument("--no-timing", action="store_true", help="parameters and memory only (timing needs an idle machine)")
    p.add_argument("--params-only", action="store_true", help="exact parameter counts only (no step is run)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few steps: a smoke run")
    p.add_argument("--simulate", action="store_true", help="plan every arm's step on tensors without data "
                   "(elr_ext.plan) for --plan-device instead of running it: peak memory, FLOPs, roofline s/it")
    p.add_argument("--plan-device", default="v100-32gb", help="--simulate: the card (elr_ext.plan.DEVICES) or cpu")
    p.add_argument("--out-dir", default=harness.RESULTS_DIR)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)
    p.add_argument("--backbones", default=None, help="keep the built backbones (dense and decomposed) in this folder "
                   "and reuse them on the next run (SD 2.1's decomposition takes minutes); default: a temporary one")
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    if args.quick:
        args.latent = args.latent or 16
        args.batch = args.batch or [1]
        args.repeats, args.rounds, args.warmup = min(args.repeats, 3), 1, 1
    if args.simulate:
        gpu = args.plan_device != "cpu"
        args.device = "cpu"
    if args.batch is None:
        args.batch = [2] if args.config == "tiny" else ([1, 4, 8] if args.simulate and gpu else [1, 2, 4] if gpu else [1])
    if args.latent is None:  # a GPU (or a plan for one) at the family's training size: 512 px SD, 1024 px SDXL
        args.latent = 32 if args.config == "tiny" else ((128 if args.config == "sdxl" else 64) if gpu else 32)
    args.steps = args.steps or (2 if args.quick else args.repeats)
    args.timing = args.timing or ("interleaved" if args.config == "tiny" else "fresh")
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        p.error(f"--arms: unknown {unknown}; known: {list(ARMS)}")
    return args


def main(argv=None) -> List[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    autocast_dtype = getattr(torch, args.dtype or "bfloat16") if device.type == "cuda" else None
    if args.simulate:
        autocast_dtype = getattr(torch, args.dtype or "float16") if args.plan_device != "cpu" else None
    precision = f"fp32 weights, autocast {autocast_dtype}" if autocast_dtype else "fp32"

    if args.child:  # one arm in this fresh process
        cfg = StepConfig(args.config, args.batch[0], args.latent, tuple(args.conditions), terms=args.terms,
                         rank=args.rank, rank_ratio=args.rank_ratio, gradient_checkpointing=args.gradient_checkpointing)
        print(json.dumps(child(cfg, args.child, args.job, device, autocast_dtype, args.warmup, args.steps,
                               args.backbones, args.plan_device)), flush=True)
        if args.simulate:  # see python/train.py end_after_plan: a planned process may abort in teardown
            sys.stderr.flush()
            os._exit(0)
        return []
    if args.simulate:
        return [simulate_config(args, StepConfig(args.config, batch, args.latent, tuple(args.conditions),
                                                 terms=args.terms, rank=args.rank, rank_ratio=args.rank_ratio,
                                                 gradient_checkpointing=args.gradient_checkpointing), precision)
                for batch in args.batch]

    print("train_step settings: " + ", ".join(f"{k}={v}" for k, v in vars(args).items() if k not in ("child", "job")))
    configs = [StepConfig(args.config, batch, args.latent, tuple(args.conditions), terms=args.terms, rank=args.rank,
                          rank_ratio=args.rank_ratio, gradient_checkpointing=args.gradient_checkpointing)
               for batch in args.batch]
    keep = args.backbones is not None
    args.backbones = args.backbones or tempfile.mkdtemp(prefix="train_step_backbones_")
    try:  # the backbones do not depend on the batch: built once for all batch sizes
        save_backbones(configs[0], any(ARMS[a].decomposed for a in args.arms), args.backbones)
        return [run_config(args, cfg, device, autocast_dtype, precision) for cfg in configs]
    finally:
        if not keep:
            shutil.rmtree(args.backbones, ignore_errors=True)


def simulate_config(args, cfg: StepConfig, precision: str) -> dict:
    """Every arm planned (one fresh process each); beside a CPU plan, the measured peak of the same
    configuration where a committed result has it, and the planner's error against it."""
    print(f"== planned: {cfg.describe()} on {args.plan_device}", flush=True)
    rows = []
    for arm in args.arms:
        res = harness.run_fresh(_child_args(args, arm, "plan", cfg.batch), tries=PLAN_TRIES)
        rows.append({"arm": arm, "description": ARMS[arm].label, **dataclasses.asdict(ARMS[arm]), **res})
    summarise(rows)
    stem = os.path.join(args.out_dir, f"train_step_plan_{args.plan_device}_{args.config}_b{cfg.batch}_s{args.latent}"
                        + ("_ckpt" if args.gradient_checkpointing else ""))
    measured_path = os.path.join(harness.RESULTS_DIR, f"train_step_cpu_{args.config}_b{cfg.batch}_s{args.latent}"
                                 + ("_ckpt" if args.gradient_checkpointing else "") + ".json")
    if args.plan_device == "cpu" and os.path.isfile(measured_path):
        with open(measured_path) as f:
            measured = {r["arm"]: r.get("peak_memory_bytes") for r in json.load(f)["rows"]}
        for row in rows:
            got = measured.get(row["arm"])
            row["measured_peak_bytes"] = got
            row["plan_error"] = (row["peak_memory_bytes"] / got - 1) if got and row.get("peak_memory_bytes") else None
    result = {"benchmark": "train_step --simulate", "plan_device": args.plan_device, "config": dataclasses.asdict(cfg),
              "config_description": cfg.describe(), "device": f"planned for {args.plan_device}",
              "precision": precision, "timing": "roofline estimate (elr_ext.plan)", "torch": torch.__version__,
              "measured_from": measured_path if args.plan_device == "cpu" else None,
              "time": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}
    table = format_table(result) + "\n" + plan_lines(rows)
    print(table, flush=True)
    os.makedirs(args.out_dir, exist_ok=True)
    write_results(stem, result, table)
    return result


def plan_lines(rows: List[dict]) -> str:
    """The planned numbers the table has no column for: FLOPs, where the peak falls, the planner's error."""
    base = next((r for r in rows if r["arm"] == BASELINE and r.get("flops")), None)
    lines = []
    for r in rows:
        if not r.get("peak"):
            lines.append(f"{r['arm']:12s} not planned")
            continue
        flops = f"{r['flops'] / 1e12:.2f} TFLOP" + (f" ({r['flops'] / base['flops']:.3f}x)" if base else "")
        # GiB for the SD-sized steps, MiB for the tiny ones (whose parts are a few MiB each)
        unit, scale = ("GiB", 2 ** 30) if r["peak"]["total"] >= 2 ** 30 else ("MiB", 2 ** 20)
        split = ", ".join(f"{k} {v / scale:.2f}" for k, v in r["peak"]["split"].items() if v >= scale / 16)
        error = ""
        if r.get("plan_error") is not None:
            error = (f"; measured {r['measured_peak_bytes'] / scale:.2f} {unit}, "
                     f"plan error {r['plan_error'] * 100:+.1f} %")
        lines.append(f"{r['arm']:12s} {flops}; peak in {r['peak']['phase']} ({split} {unit}){error}; "
                     f"planned in {r['seconds_to_plan']:.0f} s")
    return "\n".join(lines)


def run_config(args, cfg: StepConfig, device, autocast_dtype, precision: str) -> dict:
    """Every arm at one configuration: counts and memory (fresh processes), timing, files."""
    batch = cfg.batch
    print(f"== {cfg.describe()}", flush=True)
    memory = measure_memory(args, args.arms, batch, args.memory_jobs, "params" if args.params_only else "memory")
    times = {}
    if not (args.no_timing or args.params_only):
        if args.timing == "interleaved":
            times = time_interleaved(cfg, args.arms, device, autocast_dtype, args.repeats, args.backbones)
        else:
            times = time_fresh(args, args.arms, batch, args.rounds)
    rows = []
    for arm in args.arms:
        mem = memory.get(arm) or {}
        rows.append({"arm": arm, "description": ARMS[arm].label, **dataclasses.asdict(ARMS[arm]),
                     "trainable_params": mem.get("trainable_params"), "total_params": mem.get("total_params"),
                     "adapter_params": mem.get("adapter_params"), "backbone_params": mem.get("backbone_params"),
                     "peak_memory_bytes": mem.get("peak_memory_bytes"),
                     "peak_total_bytes": mem.get("peak_total_bytes"),
                     "seconds_per_iteration": times.get(arm)})
    summarise(rows)
    result = {
        "benchmark": "train_step", "config": dataclasses.asdict(cfg), "config_description": cfg.describe()
        + (" (reduced from 512 px to fit this machine's memory)" if cfg.name == "sd21" and device.type == "cpu"
           else ""),
        "device": harness.device_name(device), "device_type": device.type, "precision": precision,
        "timing": "not measured" if args.no_timing or args.params_only else
        (f"{args.timing}, median of {args.repeats} steps" + (f" x {args.rounds} rounds" if args.timing == "fresh"
                                                              else "") + f" after {args.warmup} warm-up"),
        "memory": "not measured" if args.params_only else "GPU max_memory_allocated" if device.type == "cuda" else
        "peak RSS over the measured steps minus RSS before the build, fresh process per arm",
        "torch": torch.__version__, "python": platform.python_version(),
        "elr_ext_backends": elr_ext.available_backends(device.type),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": args.quick, "rows": rows,
    }
    table = format_table(result)
    print(table, flush=True)
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"train_step_{device.type}_{args.config}_b{batch}_s{args.latent}"
                        + ("_ckpt" if args.gradient_checkpointing else "") + ("_quick" if args.quick else "")
                        + ("_params" if args.params_only else ""))
    write_results(stem, result, table)
    return result


if __name__ == "__main__":
    main()
