#!/usr/bin/env python
"""Train ELR-Diffusion (paper: ../shared/paper/elr-diffusion.txt, DESIGN.md section 7).

    python python/train.py --stage 2      # the built-in default: tiny model, synthetic scenes, CPU;
                                          # runs stage 0 (teacher) and stage 1 (student) first
    python python/train.py --stage 1 --pretrained SD21_FOLDER --data LAION_SHARDS --output-dir runs/stage1
    python python/train.py --stage 2 --backbone runs/stage1 --pretrained SD21_FOLDER --data UNI_FOLDER \
        --condition-types canny sketch seg
    accelerate launch --num_processes 8 python/train.py --stage 2 ...     # DDP; see python/configs/

Stages: 0 trains the tiny teacher (the default only), 1 distils a low-rank student from a frozen
teacher, 2 trains the local control adapter on the frozen stage-1 backbone. The script reads top to
bottom: arguments -> configuration -> set-up -> training loop -> validation -> saving. What each
stage trains and its loss live in elr_training/stages.py; data in elr_training/data/.

A run folder holds: model/ (the trained model), checkpoints/checkpoint-<step>/, logs/ (TensorBoard),
samples/step-<N>.png and samples.png (the last validation grid), loss_curves.png, metrics.json.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import time

try:
    import elr_ext  # noqa: F401
except ImportError:  # running from a checkout that was built in place but not pip-installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from PIL import Image
from tqdm.auto import tqdm

from elr_training.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from elr_training.config import (
    ControlConfig,
    DistillConfig,
    TeacherConfig,
    describe,
    make_config,
    parse_config,
    to_dict,
)
from elr_training.data import ConditionMaker, ConditionSettings, build_training_data, build_validation_set
from elr_training.models import load_components, tiny_components, unwrap
from elr_training.run_log import RunLog, environment, plot_curves, write_json
from elr_training.stages import STAGES, control_verdict, weight_dtype_of

# Fields of the user's stage-2 command that the stages run before it (the default chain) inherit;
# everything else (learning rate, steps, validation cadence ...) comes from each stage's own preset.
INHERITED_BY_EARLIER_STAGES = (
    "seed",
    "data",
    "data_format",
    "caption_column",
    "synthetic_size",
    "synthetic_max_shapes",
    "resolution",
    "dataloader_num_workers",
    "train_batch_size",
    "gradient_accumulation_steps",
    "mixed_precision",
    "gradient_checkpointing",
    "compile",
    "cpu",
    "num_threads",
    "deterministic",
    "num_inference_steps",
    "num_validation_images",
    "loss_weighting",
    "snr_gamma",
)


def main(argv=None) -> dict:
    # ---------------------------------------------------------------- arguments -> configuration
    config, sources = parse_config(argv)
    with reproducible(config):
        return train(config, sources)


@contextlib.contextmanager
def reproducible(config):
    """--num-threads and --deterministic for the run, torch's previous settings restored after it."""
    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (CUDA >= 10.2)
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1])
        torch.backends.cudnn.benchmark = before[2]


def train(config, sources) -> dict:
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        cpu=config.cpu,
        project_config=ProjectConfiguration(project_dir=config.output_dir),
    )
    started = time.perf_counter()

    # The built-in default: stage 2 without a backbone first trains one (stage 0, then stage 1).
    earlier = {}
    if config.stage == 2 and config.backbone is None and config.pretrained is None:
        teacher_dir, student_dir = (os.path.join(config.output_dir, f"stage{k}") for k in (0, 1))
        accelerator.print(
            f"--stage 2 without --backbone: training the tiny teacher (stage 0) in {teacher_dir}, "
            f"then the low-rank student (stage 1) in {student_dir}, then the control adapter (stage 2)"
        )
        for number, folder, extra in ((0, teacher_dir, {}), (1, student_dir, {"teacher": teacher_dir})):
            inherited = {
                k: getattr(config, k) for k in INHERITED_BY_EARLIER_STAGES if sources[k] in ("cli", "yaml")
            }
            if config.earlier_stage_steps:
                inherited["max_train_steps"] = config.earlier_stage_steps[number]
            if config.resume_from_checkpoint == "latest":
                inherited["resume_from_checkpoint"] = "latest"
            stage_config, stage_sources = make_config(
                {0: TeacherConfig, 1: DistillConfig}[number],
                dict(stage=number, output_dir=folder, **inherited, **extra),
            )
            earlier[f"stage{number}"] = run_stage(stage_config, stage_sources, accelerator)
        config.backbone = student_dir
        sources["backbone"] = "stage 1 above"
    elif config.stage == 1 and config.teacher is None and config.pretrained is None:
        raise SystemExit(
            "--stage 1 needs --teacher (a stage-0 run or model folder) or --pretrained (SD 2.1 folder); "
            "`--stage 2` alone runs stages 0 and 1 for you"
        )

    result = run_stage(config, sources, accelerator)
    if accelerator.is_main_process and earlier:
        summarise_chain(config.output_dir, earlier, result, time.perf_counter() - started)
    accelerator.end_training()
    return result


def run_stage(config, sources, accelerator) -> dict:
    """Trains one stage; returns its metrics (also written to <output_dir>/metrics.json)."""
    say = accelerator.print
    say(describe(config, sources))  # every value and where it came from
    os.makedirs(config.output_dir, exist_ok=True)
    started = time.perf_counter()

    # ---------------------------------------------------------------- set-up: models
    set_seed(config.seed)  # new layers' initial weights (the adapter's) are a function of the seed
    components = load_stage_components(config, say)
    device = accelerator.device
    weight_dtype = weight_dtype_of(config.mixed_precision)
    components.text_encoder.requires_grad_(False).eval()
    if components.vae is not None:
        components.vae.requires_grad_(False).eval()
    stage = STAGES[config.stage](config, components, device, say)
    model = stage.trained_module()
    # Frozen UNets (teacher, backbone) in the low precision; what trains stays fp32 (master weights).
    for frozen in (
        components.text_encoder,
        components.vae,
        getattr(stage, "teacher", None),
        getattr(stage, "unet", None),
    ):
        if frozen is not None and frozen is not model:
            frozen.to(device)
            if weight_dtype != torch.float32:
                frozen.to(dtype=weight_dtype)
    model.to(device)
    if config.gradient_checkpointing:
        stage.enable_gradient_checkpointing()
    trained_names = stage.trained_names()
    named = dict(model.named_parameters())
    params = [named[n] for n in trained_names]
    say(f"trained parameters: {sum(p.numel() for p in params):,} in {len(params)} tensors")

    # ---------------------------------------------------------------- set-up: data
    condition_maker = None
    if isinstance(config, ControlConfig):
        condition_maker = ConditionMaker(
            config.condition_types,
            ConditionSettings(
                canny_low_threshold=config.canny_low_threshold,
                canny_high_threshold=config.canny_high_threshold,
                xdog_sigma=config.xdog_sigma,
                segmentation_model=config.segmentation_model,
            ),
        )
    data = build_training_data(config, condition_maker, accelerator.process_index, accelerator.num_processes)
    validation_samples = build_validation_set(config, condition_maker) if accelerator.is_main_process else []
    updates_per_epoch = (
        math.ceil(data.batches_per_epoch / config.gradient_accumulation_steps)
        if data.batches_per_epoch
        else None
    )
    max_steps = config.max_train_steps or (
        updates_per_epoch * config.num_train_epochs if updates_per_epoch else None
    )
    say(
        f"data: {data.format}, {data.batches_per_epoch or 'unknown (streamed)'} batches of "
        f"{config.train_batch_size} per process and epoch, {accelerator.num_processes} process(es); "
        f"{max_steps or 'all'} optimiser steps"
    )

    # ---------------------------------------------------------------- set-up: optimiser, schedule, accelerate
    optimizer = torch.optim.AdamW(
        params,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )
    if max_steps is None and config.lr_scheduler not in ("constant", "constant_with_warmup"):
        raise ValueError(
            f"--lr-scheduler {config.lr_scheduler} needs a known length: give --max-train-steps "
            f"(streamed shards have no length)"
        )
    # Stepped once per optimiser step by this script (not prepared): its state is the step count.
    lr_scheduler = get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=max_steps
    )
    if accelerator.distributed_type.value == "DEEPSPEED":  # the data loader is ours, not accelerate's
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = (
            config.train_batch_size
        )
    model, optimizer = accelerator.prepare(model, optimizer)
    if config.compile:
        model = torch.compile(model)
        for frozen in ("teacher", "unet"):
            if getattr(stage, frozen, None) is not None and getattr(stage, frozen) is not unwrap(model):
                setattr(stage, frozen, torch.compile(getattr(stage, frozen)))

    # ---------------------------------------------------------------- resume
    log = RunLog(config.output_dir, enabled=accelerator.is_main_process)
    checkpoints_dir = os.path.join(config.output_dir, "checkpoints")
    global_step, epoch, batch_in_epoch, micro_step = 0, 0, 0, 0
    skipped = {"image": 0, "shard": 0}
    history = {}
    if config.resume_from_checkpoint:
        path = find_checkpoint(config.resume_from_checkpoint, checkpoints_dir, say)
        if path is None:
            say(f"--resume-from-checkpoint latest: no checkpoint in {checkpoints_dir} yet, starting fresh")
        else:
            state = load_checkpoint(accelerator, path, model, optimizer, lr_scheduler)
            global_step, epoch, batch_in_epoch = state["global_step"], state["epoch"], state["batch_in_epoch"]
            micro_step, skipped, history = state["micro_step"], state["skipped"], state.get("history", {})
            for name, points in history.items():
                log.history[name] = [tuple(p) for p in points]
            say(
                f"resumed from {path}: step {global_step}, epoch {epoch}, batch {batch_in_epoch} of the epoch"
            )
    if accelerator.is_main_process:
        log.text("config", describe(config, sources))

    # A fixed batch whose loss is measured before and after training (same noise and timesteps).
    fixed_batch = first_batch(data, epoch)
    loss_before = fixed_batch_loss(stage, model, fixed_batch, config.seed)

    # ---------------------------------------------------------------- training loop
    def checkpoint_state():
        return {
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "micro_step": micro_step,
            "skipped": skipped,
            "history": {k: list(v) for k, v in log.history.items()},
        }

    progress = tqdm(
        total=max_steps,
        initial=global_step,
        desc=f"stage {config.stage}",
        disable=not accelerator.is_local_main_process,
        dynamic_ncols=True,
    )
    validation_metrics, last_grid, validated_at = {}, None, None
    step_times = []
    done = max_steps is not None and global_step >= max_steps
    while not done:
        data.start_epoch(epoch, batch_in_epoch)
        tick = time.perf_counter()
        for batch in data.loader:
            batch_in_epoch += 1
            for marker in batch["skipped"]:
                skipped[marker.kind] += 1
                say(f"skipped {marker.kind} {marker.where}: {marker.reason}")
            # Every draw of this micro-batch comes from a generator seeded by (seed, micro-step, process).
            generator = torch.Generator().manual_seed(
                hash_seed(config.seed, micro_step, accelerator.process_index)
            )
            micro_step += 1
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    if batch["n"] > 0:
                        loss, logs = stage.loss(model, batch, generator)
                    else:  # every sample unreadable: a zero loss keeps the processes' steps in line
                        loss, logs = sum((p * 0).sum() for p in params), {"loss": float("nan")}
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue

            # ---- one optimiser step done
            lr_scheduler.step()
            global_step += 1
            step_times.append(time.perf_counter() - tick)
            tick = time.perf_counter()
            lr = lr_scheduler.get_last_lr()[0]
            progress.update(1)
            progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{lr:.2e}", s_per_it=f"{step_times[-1]:.2f}")
            if global_step % config.logging_steps == 0:
                log.scalars(
                    {f"train/{k}": v for k, v in logs.items()}
                    | {"train/lr": lr, "train/s_per_it": step_times[-1]},
                    global_step,
                )

            done = max_steps is not None and global_step >= max_steps
            if config.checkpointing_steps and (global_step % config.checkpointing_steps == 0 or done):
                path = save_checkpoint(
                    accelerator,
                    checkpoints_dir,
                    global_step,
                    model,
                    trained_names,
                    optimizer,
                    lr_scheduler,
                    checkpoint_state(),
                    config.checkpoints_total_limit,
                )
                say(f"saved {path}")
            if config.validation_steps and (global_step % config.validation_steps == 0 or done):
                last_grid, validation_metrics = validate(
                    stage, validation_samples, global_step, log, config, accelerator
                )
                validated_at = global_step
            if done:
                break
        else:  # the epoch ran out
            epoch, batch_in_epoch = epoch + 1, 0
            if max_steps is None and epoch >= config.num_train_epochs:
                done = True
    progress.close()

    # ---------------------------------------------------------------- final validation and saving
    if validated_at != global_step:
        last_grid, validation_metrics = validate(
            stage, validation_samples, global_step, log, config, accelerator
        )
    loss_after = fixed_batch_loss(stage, model, fixed_batch, config.seed)
    totals = accelerator.reduce(torch.tensor([skipped["image"], skipped["shard"]], device=device), "sum")
    # Every process must end with the same weights (DDP averages gradients): compare checksums.
    checksums = accelerator.gather(weights_checksum(params).to(device)[None]).cpu().tolist()
    if len({tuple(c) for c in checksums}) > 1:
        say(f"WARNING: the processes' weights differ: checksums {checksums}")
    model_dir = os.path.join(config.output_dir, "model")
    if accelerator.is_main_process:
        stage.save(model_dir)
        say(f"saved the trained model to {model_dir}")
    accelerator.wait_for_everyone()

    metrics = {
        "stage": config.stage,
        "global_step": global_step,
        "wall_time_s": time.perf_counter() - started,
        "s_per_it_median": float(np.median(step_times)) if step_times else None,
        "fixed_batch_loss_before": loss_before,
        "fixed_batch_loss_after": loss_after,
        "train_loss_first10": mean_of(log.history.get("train/loss", [])[:10]),
        "train_loss_last10": mean_of(log.history.get("train/loss", [])[-10:]),
        "skipped_images": int(totals[0]),
        "skipped_shards": int(totals[1]),
        "trained_parameters": sum(p.numel() for p in params),
        "weights_checksum_per_process": checksums,
        **{k.replace("val/", "validation_"): v for k, v in validation_metrics.items()},
        "model_dir": model_dir,
        "environment": environment(),
        "config": to_dict(config),
    }
    if hasattr(stage, "parameter_counts"):
        metrics["adapter_parameters"] = stage.parameter_counts
    if config.stage == 2:
        metrics["control_verdict"] = control_verdict(validation_metrics)
    if hasattr(stage, "report_dict"):
        metrics["decomposition"] = stage.report_dict()
    if accelerator.is_main_process:
        log.save_loss_curves()
        write_json(os.path.join(config.output_dir, "metrics.json"), metrics)
        log.close()
        metrics["loss_history"] = {k: v for k, v in log.history.items() if k.startswith("train/loss")}
        say(
            f"stage {config.stage} done in {metrics['wall_time_s']:.0f} s: loss on a fixed batch "
            f"{loss_before:.4f} -> {loss_after:.4f}; {summary_line(validation_metrics)}"
        )
        say(
            f"run folder {config.output_dir}: model/, checkpoints/, logs/, samples.png, loss_curves.png, "
            "metrics.json"
        )
        if config.stage == 2:
            say(metrics["control_verdict"])
    return metrics


def load_stage_components(config, say):
    """The model parts the stage starts from (see elr_training/models.py for the folder layout)."""
    if isinstance(config, TeacherConfig):
        if config.pretrained:
            raise SystemExit(
                "stage 0 trains the tiny built-in teacher; a --pretrained model is already a teacher: "
                "use --stage 1 --pretrained ..."
            )
        say(f"tiny built-in configuration (elr_ext.tiny), seed {config.seed}")
        return tiny_components(
            config.seed, prediction_type=config.prediction_type, beta_schedule=config.beta_schedule
        )
    if isinstance(config, DistillConfig):
        if config.teacher:
            say(f"teacher: {config.teacher}")
            return load_components(config.teacher, "--teacher", require_vae=False)
        say(f"teacher: the UNet of --pretrained {config.pretrained}")
        return load_components(config.pretrained, "--pretrained", require_vae=True)
    if config.backbone:
        say(f"backbone: {config.backbone}")
        components = load_components(config.backbone, "--backbone")
        if (
            config.pretrained and components.vae is None
        ):  # a backbone folder may leave the VAE to --pretrained
            components.vae = load_components(config.pretrained, "--pretrained", require_vae=True).vae
        return components
    say(
        f"backbone: the dense UNet of --pretrained {config.pretrained} (the paper's backbone is the stage-1 "
        f"student: pass --backbone to use one)"
    )
    return load_components(config.pretrained, "--pretrained", require_vae=True)


def validate(stage, samples, step, log, config, accelerator):
    """Validation grid and metrics on the main process; the others wait."""
    grid, metrics = None, {}
    if accelerator.is_main_process:
        with accelerator.autocast():  # frozen parts in the low precision, trained ones in fp32
            grid, metrics = stage.validate(samples, step)
        folder = os.path.join(config.output_dir, "samples")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(grid).save(os.path.join(folder, f"step-{step}.png"))
        shutil.copyfile(
            os.path.join(folder, f"step-{step}.png"), os.path.join(config.output_dir, "samples.png")
        )
        log.image("validation/grid", grid, step)
        log.scalars(metrics, step)
        log.flush()
        accelerator.print(f"validation at step {step}: {summary_line(metrics)}")
    accelerator.wait_for_everyone()
    return grid, metrics


def first_batch(data, epoch):
    """The first readable batch of the epoch (for the before/after loss)."""
    data.start_epoch(epoch, 0)
    for batch in data.loader:
        if batch["n"] > 0:
            return batch
    raise RuntimeError("no readable sample in the training data")


def fixed_batch_loss(stage, model, batch, seed: int) -> float:
    generator = torch.Generator().manual_seed(seed + 12345)
    with torch.no_grad():
        loss, _ = stage.loss(model, batch, generator)
    return float(loss)


def weights_checksum(params) -> torch.Tensor:
    """(sum, sum of squares, sum of |x| * position) of all trained values in float64: equal weights give
    equal checksums, and a difference anywhere changes them."""
    with torch.no_grad():
        flat = torch.cat([p.detach().double().flatten().cpu() for p in params])
        position = torch.arange(flat.numel(), dtype=torch.float64) / flat.numel()
        return torch.stack([flat.sum(), (flat * flat).sum(), (flat.abs() * position).sum()])


def hash_seed(seed: int, step: int, rank: int) -> int:
    """Independent streams per (seed, micro-step, process) from numpy's SeedSequence."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0] % (2**63))


def mean_of(points) -> float | None:
    values = [v for _, v in points if not math.isnan(v)]
    return float(np.mean(values)) if values else None


def summary_line(metrics: dict) -> str:
    return ", ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in metrics.items()) or "no validation metrics"


def summarise_chain(output_dir: str, earlier: dict, final: dict, wall_time: float) -> None:
    """The chained default's run folder also gets the metrics and loss curves of all three stages."""
    curves = {
        f"{name} train/loss": metrics["loss_history"].get("train/loss", [])
        for name, metrics in list(earlier.items()) + [("stage2", final)]
    }
    plot_curves(curves, os.path.join(output_dir, "loss_curves.png"), title="stages 0, 1, 2")
    drop = ("config", "loss_history")
    metrics = {
        **{k: v for k, v in final.items() if k != "loss_history"},
        "wall_time_all_stages_s": wall_time,
        "earlier_stages": {k: {m: v for m, v in e.items() if m not in drop} for k, e in earlier.items()},
    }
    write_json(os.path.join(output_dir, "metrics.json"), metrics)
    print(f"all three stages done in {wall_time:.0f} s; run folder {output_dir}")
    print(final["control_verdict"])


if __name__ == "__main__":
    from elr_training.cli import run_cli

    run_cli(main, "train.py")
