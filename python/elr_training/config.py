"""Configuration of train.py: one dataclass per stage, filled from defaults, a preset, a YAML file and
the command line, in that order of precedence (the command line wins).

Fields left at None are filled from a preset: "tiny" (the built-in CPU configuration, chosen when no
--pretrained folder is given) or "paper" (Stable Diffusion 2.1 as in the paper's section 3.3: AdamW,
lr 1e-5, 512 x 512, one epoch). `describe(config)` prints every value with where it came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml


def _f(default, help: str, **kw):
    """A dataclass field with its --help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """What every stage shares."""

    stage: int = _f(2, "0: teacher (tiny default only), 1: low-rank distillation, 2: control adapter")
    output_dir: Optional[str] = _f(None, "run folder (default runs/elr-stage<N>)")
    config: Optional[str] = _f(None, "YAML file of field: value pairs (command-line flags override it)")
    preset: Optional[str] = _f(None, "tiny or paper; default: paper with --pretrained, tiny otherwise")
    seed: int = _f(0, "seed of weights (tiny), data order, noise and condition dropout")
    pretrained: Optional[str] = _f(
        None,
        "local Stable Diffusion 1.x, 2.x or SDXL folder in diffusers format (unet, vae, text_encoder, "
        "tokenizer, scheduler; SDXL also text_encoder_2, tokenizer_2); the family is read from the folder; "
        "nothing is downloaded",
    )
    pretrained_vae: Optional[str] = _f(
        None,
        "a VAE folder (config.json + weights) or model folder whose vae/ replaces --pretrained's, e.g. an "
        "fp16-safe SDXL VAE (SDXL's own overflows in fp16)",
    )
    # data
    data: str = _f("synthetic", "'synthetic', or a data folder / shard spec (see --data-format)")
    data_format: str = _f(
        "auto",
        "auto, synthetic, unicontrolnet (anno.txt), imagefolder (metadata.jsonl), "
        "webdataset (tar shards: folder, glob or comma list)",
    )
    caption_column: str = _f("text", "caption field of an imagefolder metadata.jsonl")
    synthetic_size: Optional[int] = _f(None, "number of synthetic training scenes")
    synthetic_max_shapes: int = _f(2, "at most this many shapes per synthetic scene")
    resolution: Optional[int] = _f(None, "training image size (square)")
    dataloader_num_workers: int = _f(0, "data-loader worker processes")
    cache_latents: Optional[str] = _f(
        None,
        "a folder for cached VAE latents and text embeddings: the first run encodes the training data into "
        "safetensors shards there (resumable), later runs with the same model, resolution, data and "
        "conditions train from it without the VAE encoder or text encoder(s) on the device; a cache made "
        "for anything else is refused (synthetic, unicontrolnet and imagefolder data; not webdataset); "
        "with --plan, the cached run is planned",
    )
    # optimisation
    train_batch_size: Optional[int] = _f(None, "batch size per process")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimiser step")
    learning_rate: Optional[float] = _f(None, "AdamW learning rate")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_weight_decay: float = _f(1e-2, "AdamW weight decay")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon")
    optimizer: str = _f(
        "adamw",
        "adamw (torch.optim.AdamW, fp32 state: 8 bytes per trained parameter) or adamw8bit "
        "(bitsandbytes' blockwise 8-bit AdamW: about 2 bytes per parameter; tensors under 4096 "
        "values keep fp32 state)",
    )
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0: off)")
    lr_scheduler: str = _f(
        "constant", "diffusers scheduler name: constant, constant_with_warmup, cosine, linear ..."
    )
    lr_warmup_steps: int = _f(0, "warm-up optimiser steps")
    num_train_epochs: Optional[int] = _f(None, "epochs (ignored when --max-train-steps is set)")
    max_train_steps: Optional[int] = _f(None, "optimiser steps; overrides --num-train-epochs")
    loss_weighting: Optional[str] = _f(None, "timestep weighting w(lambda_t): constant or min-snr")
    snr_gamma: float = _f(5.0, "gamma of min-SNR weighting")
    # precision and speed
    mixed_precision: str = _f(
        "no", "no, fp16 or bf16 (fp32 master weights; frozen models in the low precision)"
    )
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass")
    compile: bool = _f(False, "torch.compile the models")
    cpu: bool = _f(False, "train on the CPU even when a GPU is present")
    allow_tf32: bool = _f(
        False,
        "let fp32 matmuls and convolutions use TF32 tensor cores on Ampere and newer GPUs "
        "(torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32): faster, about 10 "
        "mantissa bits; no effect on the CPU",
    )
    set_grads_to_none: bool = _f(
        True,
        "after each optimiser step set the gradients to None rather than to zero "
        "(optimizer.zero_grad(set_to_none=True)): less memory between steps; --no-set-grads-to-none zeros them",
    )
    num_threads: Optional[int] = _f(
        None,
        "CPU threads of torch (torch.set_num_threads; 0: torch's default, the core count). CPU results "
        "depend on it in the last bits, and training amplifies those: the tiny preset fixes 2",
    )
    deterministic: Optional[bool] = _f(
        None,
        "torch.use_deterministic_algorithms (with CUBLAS_WORKSPACE_CONFIG on CUDA): the same command "
        "gives the same numbers; tiny preset: on, paper preset: off (slower kernels on a GPU)",
    )
    # checkpoints, logging, validation
    checkpointing_steps: Optional[int] = _f(
        None, "save a checkpoint every N optimiser steps (and at the end)"
    )
    checkpoints_total_limit: Optional[int] = _f(3, "keep at most this many checkpoints")
    resume_from_checkpoint: Optional[str] = _f(None, "'latest' or a checkpoint folder")
    validation_steps: Optional[int] = _f(
        None, "sample a validation grid every N optimiser steps (and at the end)"
    )
    num_validation_images: Optional[int] = _f(None, "validation scenes per grid")
    num_inference_steps: Optional[int] = _f(None, "sampling steps of validation (DDIM)")
    guidance_scale: Optional[float] = _f(None, "classifier-free guidance of validation")
    logging_steps: int = _f(1, "log scalars every N optimiser steps")
    report_to: str = _f(
        "tensorboard",
        "trackers that receive the scalars, the configuration and the validation grids, through "
        "accelerate's trackers: tensorboard (<output_dir>/logs/<project>/), wandb (set WANDB_MODE=offline to write "
        "<output_dir>/wandb/ without a network), all (both), none",
    )
    tracker_project_name: str = _f("elr-diffusion", "the trackers' project name (wandb project, TensorBoard sub-folder)")
    # weight averaging
    use_ema: bool = _f(
        False,
        "keep an exponential moving average of the trained weights (diffusers' EMAModel, over the "
        "trained tensors only): validation and the saved model use it; checkpoints hold the raw weights "
        "and the average, resume restores both",
    )
    ema_decay: float = _f(
        0.9999, "EMA decay, reached after a warm-up: min(decay, (1 + k) / (10 + k)) at optimiser step k + 1"
    )
    # planning (no training)
    plan: bool = _f(
        False,
        "plan one optimiser step of this configuration on tensors without data (no weights are read, "
        "nothing is trained): peak GPU memory by kind, FLOPs, a roofline time for --plan-device, "
        "whether it fits; then exit",
    )
    plan_device: str = _f("v100-32gb", "the card --plan estimates for (an unknown name lists the known ones)")
    architecture: Optional[str] = _f(
        None,
        "without --pretrained: the tiny built-in model (tiny, the default) or a family-shaped variant of it "
        "(tiny-sd15, tiny-sdxl: latent space, SDXL with two text encoders); with --plan also the full "
        "families' configs (sd15, sd21, sdxl)",
    )
    text_dropout: Optional[float] = _f(None, "probability of an empty caption (classifier-free guidance)")


@dataclass
class TeacherConfig(TrainConfig):
    """Stage 0: train the tiny teacher UNet from scratch (the built-in default only)."""

    prediction_type: Optional[str] = _f(
        None,
        "what the teacher predicts: epsilon or v_prediction "
        "(later stages inherit it with the model's scheduler)",
    )
    beta_schedule: Optional[str] = _f(None, "noise schedule: linear or squaredcos_cap_v2 (cosine)")


@dataclass
class DistillConfig(TrainConfig):
    """Stage 1: distil a frozen teacher into a low-rank student, student = decompose(copy of teacher)."""

    teacher: Optional[str] = _f(
        None,
        "teacher model folder (a stage-0 run, or unet/ ... layout); default: "
        "--pretrained's UNet, or run stage 0 first (tiny default)",
    )
    rank: Optional[int] = _f(None, "decompose: one rank for every layer")
    rank_ratio: Optional[float] = _f(None, "decompose: rank as a fraction of each layer's full rank")
    energy: Optional[float] = _f(None, "decompose: keep this share of each layer's spectral energy")
    param_budget: Optional[float] = _f(
        None, "decompose: total parameters of the student (count, or fraction if < 1)"
    )
    decompose_include: Optional[List[str]] = _f(None, "decompose only modules matching these patterns")
    decompose_exclude: Optional[List[str]] = _f(None, "never decompose modules matching these patterns")
    feature_distillation: Dict[str, Any] = _f(
        {},
        "feature distillation weights per level, e.g. "
        "down=0.1,mid=0.1,up=0.1 or down=0.1/0.2/0.3 (one per block)",
    )
    kd_weight: float = _f(
        1.0,
        "weight of the distillation loss (eq. 3); 0 with --task-loss-weight 1 trains the decomposed UNet "
        "without distillation (Table 1's 'Decomposed U-Net w/o Distill.')",
    )
    task_loss_weight: float = _f(0.0, "weight of the plain diffusion loss (the paper found KD alone better)")


@dataclass
class ControlConfig(TrainConfig):
    """Stage 2: train the local control adapter on the frozen (stage 1) backbone."""

    backbone: Optional[str] = _f(
        None,
        "frozen backbone folder (a stage-1 run or a model folder); default: run "
        "stages 0 and 1 first (tiny default)",
    )
    earlier_stage_steps: Optional[List[int]] = _f(
        None, "optimiser steps of stages 0 and 1 when --stage 2 runs them first (default: their presets)"
    )
    condition_types: List[str] = _f(["canny"], "conditions, concatenated in this order: canny, sketch, seg")
    adapter: str = _f("kron", "kron (Kronecker low-rank updates, ELR) or full (Uni-ControlNet baseline)")
    kron_terms: int = _f(4, "Kronecker terms n of eq. 9")
    kron_rank: int = _f(8, "rank r of eq. 9")
    kron_factor: Optional[int] = _f(
        None, "split of each layer's dimensions: default n = terms (eq. 9: A_i n x n, u_i d_out/n x r, "
        "v_i r x d_in/n); an int n for another n; -1 for LoKr's balanced split (peft / LyCORIS)"
    )
    conditioning_scale: float = _f(1.0, "scale of the adapter's residuals at validation")
    keep_all_conditions: float = _f(0.1, "condition dropout: keep all conditions with this probability")
    drop_all_conditions: Optional[float] = _f(
        None, "condition dropout: drop all conditions with this probability (paper preset 0.1, tiny 0)"
    )
    drop_each_condition: float = _f(
        0.5, "condition dropout: otherwise drop each with this probability (with two or more condition types)"
    )
    canny_low_threshold: int = _f(100, "Canny low threshold")
    canny_high_threshold: int = _f(200, "Canny high threshold")
    xdog_sigma: float = _f(0.8, "sketch (XDoG) Gaussian sigma")
    segmentation_model: Optional[str] = _f(
        None, "local transformers segmentation model for images without masks"
    )
    validation_image: Optional[List[str]] = _f(
        None,
        "your own condition images (an edge map, a sketch, a colour-coded segmentation map), sampled at "
        "every validation beside the held-out scenes (diffusers' convention: one prompt for all images, "
        "one image for all prompts, or one each)",
    )
    validation_prompt: Optional[List[str]] = _f(None, "the prompts of --validation-image (one, or one per image)")
    validation_condition_type: Optional[List[str]] = _f(
        None,
        "the condition type of each --validation-image (one for all, or one each); default: the trained "
        "type when --condition-types names one",
    )


# --report-to: accelerate's tracker names, "all" (both) and "none"
TRACKERS = ("tensorboard", "wandb", "all", "none")

RANK_POLICIES = ("rank", "rank_ratio", "energy", "param_budget")

STAGE_CONFIGS = {0: TeacherConfig, 1: DistillConfig, 2: ControlConfig}

# Values for fields left at None, per preset and stage: what every stage of a preset shares, then
# each stage's own values over it. "tiny": measured on a 2-core CPU so that `train.py --stage 2`
# (stages 0, 1, 2 in a row) finishes within 10 minutes; "paper": section 3.3.
TINY_SHARED = dict(
    loss_weighting="min-snr",
    resolution=32,
    train_batch_size=16,
    synthetic_size=4096,
    num_inference_steps=20,
    guidance_scale=2.0,
    num_train_epochs=1,
    num_threads=2,
    deterministic=True,
)
PAPER_SHARED = dict(
    loss_weighting="constant",
    resolution=512,
    train_batch_size=4,
    learning_rate=1e-5,
    num_train_epochs=1,
    num_threads=0,
    deterministic=False,
    checkpointing_steps=5000,
    validation_steps=5000,
    num_validation_images=4,
    num_inference_steps=50,
    guidance_scale=7.5,
    synthetic_size=4096,
)
PRESETS: Dict[str, Dict[int, Dict[str, Any]]] = {
    "tiny": {
        # Stage 0: epsilon with the cosine schedule and min-SNR weighting. Measured at 300 steps: flat shapes
        # on flat backgrounds, where the DDPM linear schedule (epsilon or v, constant weighting) gave noisy
        # blobs.
        0: dict(
            **TINY_SHARED,
            prediction_type="epsilon",
            beta_schedule="squaredcos_cap_v2",
            learning_rate=2e-3,
            max_train_steps=300,
            checkpointing_steps=100,
            validation_steps=300,
            num_validation_images=8,
            text_dropout=0.1,
        ),
        1: dict(
            **TINY_SHARED,
            learning_rate=1e-3,
            max_train_steps=30,  # 60 steps: validation KD MSE 0.0026 (30 s more); the budget went to stage 2
            checkpointing_steps=30,
            validation_steps=30,
            num_validation_images=8,
            text_dropout=0.0,
            # The 300-step tiny teacher's weights have flat spectra: measured KD MSE of the SVD-initialised
            # student against the teacher (eps space, 8 validation scenes): rank_ratio 0.5 -> 0.38 (1.07M
            # params), energy 0.85 -> 0.053 (1.37M), energy 0.9 -> 0.008 (1.53M of 1.66M).
            energy=0.9,
        ),
        # Stage 2. Edge NMSE with / without control over the 16 validation scenes, on one stage-1 backbone
        # (2026-12-02, 2-core CPU; without control 1.686 throughout):
        #   400 steps, lr 3e-3, Uni-ControlNet's dropout (the single condition dropped in half the steps): 1.763
        #   300 steps, the condition dropped with drop_all (0.1) only: lr 3e-3 1.439, cosine decay 1.553,
        #   lr 5e-3 1.407; caption dropout 0.1 instead of 0.5: 1.410; never dropped (drop_all 0): 1.156
        # Sampling, on the lr 3e-3 adapter: guidance 1 / 2 / 3: 1.543 / 1.439 / 1.417 (no control 1.756 /
        # 1.686 / 1.728); conditioning scale 1.3: worse (1.464); 50 DDIM steps: 1.217 vs 1.535 (both lower,
        # 2.5x the validation time). Earlier (8 scenes, LoKr split): lr 1e-2 diverged at step 100.
        # Stage 2 at 0.95 s/step is most of the 10-minute budget: 300 steps, one validation at the end.
        # canny + seg with these settings: IoU 0.367 / 0.255, but edge NMSE (canny alone) 1.871: canny only.
        2: dict(
            **TINY_SHARED,
            learning_rate=5e-3,
            max_train_steps=300,
            drop_all_conditions=0.0,
            checkpointing_steps=100,
            validation_steps=300,
            num_validation_images=16,  # edge NMSE over 16 scenes; the grid shows the first 8
            text_dropout=0.5,
        ),
    },
    "paper": {
        0: dict(
            **PAPER_SHARED,
            text_dropout=0.1,
        ),
        # Stage I: "the standard training scheme of Stable Diffusion without classifier-free guidance":
        # no text dropout.
        1: dict(
            **PAPER_SHARED,
            # rank 1/3 of full rank: SD 2.1's UNet 866M -> 365M, the whole model 1290M -> 789M (paper: 790M)
            text_dropout=0.0,
            rank_ratio=1 / 3,
        ),
        # Stage II: as Uni-ControlNet, one epoch, AdamW lr 1e-5, 512 x 512, caption dropped with
        # probability 0.5.
        2: dict(
            **PAPER_SHARED,
            text_dropout=0.5,
            drop_all_conditions=0.1,
        ),
    },
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_weights(text: str) -> Dict[str, Any]:
    """'down=0.1,mid=0.2,up=0.1/0.1/0.3' -> {'down': 0.1, 'mid': 0.2, 'up': [0.1, 0.1, 0.3]}."""
    weights: Dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        level, sep, value = part.partition("=")
        if not sep or level not in ("down", "mid", "up"):
            raise argparse.ArgumentTypeError(
                f"feature distillation: expected level=weight with level in down, mid, up, got {part!r}"
            )
        values = [float(v) for v in value.split("/")]
        weights[level] = values[0] if len(values) == 1 else values
    return weights


def build_parser(config_class) -> argparse.ArgumentParser:
    """An argparse parser whose flags are the dataclass's fields (underscores as dashes). Defaults are
    SUPPRESS, so that only flags actually given override the YAML file and the preset."""
    parser = argparse.ArgumentParser(
        description=config_class.__doc__,
        argument_default=argparse.SUPPRESS,
        epilog="Errors print as one line; --debug (or ELR_DEBUG=1) shows the full traceback instead.",
    )
    for f in dataclasses.fields(config_class):
        help_text = f"{f.metadata.get('help', '')} (default: {_default_text(f)})"
        kind = str(f.type)
        if f.name == "feature_distillation":
            parser.add_argument(_flag(f.name), type=_parse_weights, help=help_text)
        elif "bool" in kind:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, help=help_text)
        elif "List[int]" in kind:
            parser.add_argument(_flag(f.name), nargs="+", type=int, help=help_text)
        elif "List" in kind:
            parser.add_argument(_flag(f.name), nargs="+", help=help_text)
        elif "int" in kind:
            parser.add_argument(_flag(f.name), type=int, help=help_text)
        elif "float" in kind:
            parser.add_argument(_flag(f.name), type=float, help=help_text)
        else:
            parser.add_argument(_flag(f.name), type=str, help=help_text)
    return parser


def _default_text(f) -> str:
    if f.default is not dataclasses.MISSING:
        return "preset" if f.default is None else repr(f.default)
    return repr(f.default_factory())


def parse_config(argv: Optional[List[str]] = None):
    """argv -> (config of the stage's class, {field: 'default' | 'preset <name>' | 'yaml' | 'cli'})."""
    stage_parser = argparse.ArgumentParser(add_help=False)
    stage_parser.add_argument("--stage", type=int, default=2, choices=sorted(STAGE_CONFIGS))
    known, _ = stage_parser.parse_known_args(argv)
    config_class = STAGE_CONFIGS[known.stage]
    cli = vars(build_parser(config_class).parse_args(argv))
    yaml_values = load_yaml(cli["config"], config_class) if cli.get("config") else {}
    return make_config(
        config_class,
        {**yaml_values, **cli},
        sources={**{k: "yaml" for k in yaml_values}, **{k: "cli" for k in cli}},
    )


def load_yaml(path: str, config_class) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path}: no such file")
    with open(path, encoding="utf-8") as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of field: value, got {type(values).__name__}")
    values = {k.replace("-", "_"): v for k, v in values.items()}
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"--config {path}: unknown field(s) {unknown} for stage {config_class.__name__}")
    if isinstance(values.get("feature_distillation"), str):
        values["feature_distillation"] = _parse_weights(values["feature_distillation"])
    return values


def make_config(config_class, values: Dict[str, Any], sources: Optional[Dict[str, str]] = None):
    """A stage config from explicit values, with None fields filled from the preset; also used by tests."""
    sources = dict(sources or {k: "given" for k in values})
    config = config_class(**values)
    if config.preset is None:
        config.preset = "paper" if config.pretrained else "tiny"
        sources.setdefault("preset", "from --pretrained" if config.pretrained else "no --pretrained")
    if config.preset not in PRESETS:
        raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {config.preset!r}")
    given = {name for name, source in sources.items() if source in ("cli", "yaml", "given")}
    for name, value in PRESETS[config.preset][config.stage].items():
        if getattr(config, name, "absent") is not None:
            continue
        if name == "max_train_steps" and "num_train_epochs" in given:
            continue  # epochs asked for: the preset's step count must not override them
        if name in RANK_POLICIES and given & set(RANK_POLICIES):
            continue  # a rank policy was chosen: the preset's would conflict with it
        setattr(config, name, value)
        sources[name] = f"preset {config.preset}"
    if config.output_dir is None:
        config.output_dir = os.path.join("runs", f"elr-stage{config.stage}")
    validate(config)
    return config, {f.name: sources.get(f.name, "default") for f in dataclasses.fields(config)}


def validate(config) -> None:
    """Errors that name the flag, before any model is built."""
    choices = {
        "data_format": ("auto", "synthetic", "unicontrolnet", "imagefolder", "webdataset"),
        "mixed_precision": ("no", "fp16", "bf16"),
        "loss_weighting": ("constant", "min-snr"),
        "optimizer": ("adamw", "adamw8bit"),
    }
    if isinstance(config, ControlConfig):
        choices["adapter"] = ("kron", "full")
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise ValueError(f"{_flag(name)} must be one of {list(allowed)}, got {getattr(config, name)!r}")
    from .data import check_data_exists

    check_data_exists(config.data)
    if config.pretrained and config.architecture:
        raise ValueError(f"--architecture {config.architecture} and --pretrained {config.pretrained}: give one "
                         "(--pretrained's folder says its family)")
    if config.pretrained_vae and not os.path.isdir(config.pretrained_vae):
        raise FileNotFoundError(f"--pretrained-vae {config.pretrained_vae}: no such folder")
    if config.num_threads is not None and config.num_threads < 0:
        raise ValueError(f"--num-threads must be >= 0 (0: torch's default), got {config.num_threads}")
    for name in ("train_batch_size", "gradient_accumulation_steps", "resolution"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise ValueError(f"{_flag(name)} must be >= 1, got {getattr(config, name)}")
    if config.max_train_steps is None and config.num_train_epochs is None:
        raise ValueError("give --max-train-steps or --num-train-epochs")
    if config.report_to not in TRACKERS:
        raise ValueError(f"--report-to must be one of {list(TRACKERS)}, got {config.report_to!r}")
    if config.report_to in ("wandb", "all"):
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ImportError(f"--report-to {config.report_to} needs wandb: pip install wandb (or --report-to "
                              "tensorboard / none)")
    if not 0.0 <= config.ema_decay < 1.0:
        raise ValueError(f"--ema-decay must be in [0, 1), got {config.ema_decay}")
    if isinstance(config, ControlConfig):
        from .data import check_validation_pairs
        from .data.conditions import check_condition_types

        check_condition_types(config.condition_types)
        check_validation_pairs(config)
    if isinstance(config, DistillConfig):
        policies = [p for p in RANK_POLICIES if getattr(config, p) is not None]
        if len(policies) > 1:
            raise ValueError(f"give one rank policy, not {[_flag(p) for p in policies]}")
        if not (config.kd_weight or config.task_loss_weight or config.feature_distillation):
            raise ValueError(
                "--kd-weight, --task-loss-weight and --feature-distillation are all 0: no loss to train"
            )
    if config.cache_latents is not None:
        from .data.cache import check_cache_flag

        check_cache_flag(config)  # the data format, and an existing cache's settings against this run's


def describe(config, sources: Dict[str, str]) -> str:
    """Every field, its value and where it came from, one per line (printed at start)."""
    lines = [f"{type(config).__name__} (stage {config.stage}):"]
    for f in dataclasses.fields(config):
        lines.append(f"  {f.name:<28} = {getattr(config, f.name)!r:<32} [{sources.get(f.name, 'default')}]")
    return "\n".join(lines)


def to_dict(config) -> Dict[str, Any]:
    return dataclasses.asdict(config)
