#!/usr/bin/env python
"""Train ELR-Diffusion (the method: docs/method.md; the application's layout: python/README.md).

    python python/train.py --stage 2      # the built-in default: tiny model, synthetic scenes, CPU;
                                          # runs stage 0 (teacher) and stage 1 (student) first
    python python/train.py --stage 1 --pretrained SD21_FOLDER --data LAION_SHARDS --output-dir runs/stage1
    python python/train.py --stage 2 --backbone runs/stage1 --pretrained SD21_FOLDER --data UNI_FOLDER \
        --condition-types canny sketch seg
    accelerate launch --num_processes 8 python/train.py --stage 2 ...     # DDP; see python/configs/

Stages: 0 trains the tiny teacher (the default only), 1 distils a low-rank student from a frozen
teacher, 2 trains the local control adapter on the frozen stage-1 backbone. The script reads top to
bottom: arguments -> configuration -> (the default chain) -> per stage: set-up, the loop, finish.
What each stage trains and its loss live in elr_training/stages/; the loop in elr_training/loop.py;
data in elr_training/data/; the run folder's layout in elr_training/run_folder.py.
"""

from __future__ import annotations

import contextlib
import math
import os
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

from elr_ext.nn import count_parameters
from elr_training import run_folder
from elr_training.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from elr_training.config import (
    DistillConfig,
    TeacherConfig,
    describe,
    make_config,
    parse_config,
    to_dict,
)
from elr_training.data import build_training_data, build_validation_set, condition_maker_for
from elr_training.data.cache import encoders_for_validation, place_vae_decoder, prepare_cache, set_encoders_aside
from elr_training.loop import LoopState, Training, first_batch, fixed_batch_loss, mean_of, train_loop, weights_checksum
from elr_training.models import load_components, load_vae, tiny_components, weight_dtype_of
from elr_training.ema import averaged, make_ema
from elr_training.optim import make_optimizer
from elr_training.run_log import RunLog, environment
from elr_training.stages import STAGES

# Fields of the user's stage-2 command that the stages run before it (the default chain) inherit;
# everything else (learning rate, steps, validation cadence ...) comes from each stage's own preset.
INHERITED_BY_EARLIER_STAGES = (
    "seed",
    "architecture",
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
    "report_to",
    "tracker_project_name",
    "allow_tf32",
    "set_grads_to_none",
)


def main(argv=None) -> dict:
    # ---------------------------------------------------------------- arguments -> configuration
    config, sources = parse_config(argv)
    if config.plan:  # one step on tensors without data: memory, FLOPs, time on --plan-device; no training
        from elr_training.plan import run_plan

        if __name__ == "__main__" and not os.environ.get(PLAN_CHILD):
            plan_in_child(sys.argv[1:] if argv is None else argv)  # does not return
        result = run_plan(config, place_models)
        if __name__ == "__main__":
            end_after_plan()
        return result
    with reproducible(config):
        return train(config, sources)


@contextlib.contextmanager
def reproducible(config):
    """--num-threads, --deterministic and --allow-tf32 for the run, torch's previous settings restored after it."""
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
              torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if config.allow_tf32:  # TF32 tensor cores for fp32 matmuls and convolutions (Ampere and newer)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
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
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before[3], before[4]


def train(config, sources) -> dict:
    check_launch(config)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        cpu=config.cpu,
        project_config=ProjectConfiguration(project_dir=config.output_dir),
    )
    started = time.perf_counter()

    earlier = {}
    if config.stage == 2 and config.backbone is None and config.pretrained is None:
        earlier = run_earlier_stages(config, sources, accelerator)
    elif config.stage == 1 and config.teacher is None and config.pretrained is None:
        raise SystemExit(
            "--stage 1 needs --teacher (a stage-0 run or model folder) or --pretrained (SD 2.1 folder); "
            "`--stage 2` alone runs stages 0 and 1 for you"
        )

    result = run_stage(config, sources, accelerator)
    if accelerator.is_main_process and earlier:
        wall_time = time.perf_counter() - started
        run_folder.summarise_chain(config.output_dir, earlier, result, wall_time)
        print(f"all three stages done in {wall_time:.0f} s; run folder {config.output_dir}")
        print(result["control_verdict"])
    accelerator.end_training()
    return result


MPI_WORLD_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")


def check_launch(config, device_count=None) -> None:
    """A launch that cannot do what it was asked stops here, in every process, with what to do instead
    (before any process waits for another):
      - more processes on this machine than GPUs (`accelerate launch --multi_gpu --num_processes 4` on a
        two-GPU machine), without --cpu;
      - `accelerate launch --num_processes N` with N > 1 that started one process: without a config
        file accelerate starts N processes only on a machine with more than one GPU or with --multi_gpu
        (its simple launcher leaves MASTER_PORT set and no WORLD_SIZE)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    gpus = torch.cuda.device_count() if device_count is None else device_count
    if world > 1 and not config.cpu and gpus > 0 and local > gpus:
        raise SystemExit(f"accelerate launch started {local} processes on this machine, which has {gpus} GPU(s): "
                         f"give --num_processes {gpus} (one process per GPU), or train.py --cpu to train on "
                         "CPU processes")
    simple_launcher = "ACCELERATE_MIXED_PRECISION" in os.environ and "MASTER_PORT" in os.environ
    if simple_launcher and "WORLD_SIZE" not in os.environ and not any(v in os.environ for v in MPI_WORLD_VARIABLES):
        raise SystemExit(
            "accelerate launch --num_processes N (N > 1) started one process: without a config file accelerate "
            f"starts several only with more than one GPU or with --multi_gpu (this machine has {gpus} GPU(s)). "
            "For N processes on N GPUs: accelerate launch --num_processes N ...; on the CPU: accelerate launch "
            "--multi_gpu --num_processes N python/train.py --cpu ... (DDP over gloo); for one process: "
            "--num_processes 1"
        )


def run_earlier_stages(config, sources, accelerator) -> dict:
    """The built-in default: stage 2 without a backbone first trains one (stage 0, then stage 1) in
    <output_dir>/stage0 and stage1, with the user's settings that INHERITED_BY_EARLIER_STAGES names;
    stage 2 then takes stage 1's model as its backbone. Returns their metrics."""
    teacher_dir, student_dir = (os.path.join(config.output_dir, f"stage{k}") for k in (0, 1))
    accelerator.print(
        f"--stage 2 without --backbone: training the tiny teacher (stage 0) in {teacher_dir}, "
        f"then the low-rank student (stage 1) in {student_dir}, then the control adapter (stage 2)"
    )
    earlier = {}
    for number, folder, extra in ((0, teacher_dir, {}), (1, student_dir, {"teacher": teacher_dir})):
        inherited = {k: getattr(config, k) for k in INHERITED_BY_EARLIER_STAGES if sources[k] in ("cli", "yaml")}
        if config.earlier_stage_steps:
            inherited["max_train_steps"] = config.earlier_stage_steps[number]
        if config.resume_from_checkpoint == "latest":
            inherited["resume_from_checkpoint"] = "latest"
        stage_config, stage_sources = make_config(
            {0: TeacherConfig, 1: DistillConfig}[number], dict(stage=number, output_dir=folder, **inherited, **extra)
        )
        earlier[f"stage{number}"] = run_stage(stage_config, stage_sources, accelerator)
    config.backbone = student_dir
    sources["backbone"] = "stage 1 above"
    return earlier


def run_stage(config, sources, accelerator) -> dict:
    """Trains one stage; returns its metrics (also written to <output_dir>/metrics.json)."""
    accelerator.print(describe(config, sources))  # every value and where it came from
    os.makedirs(config.output_dir, exist_ok=True)
    started = time.perf_counter()
    run, validation_samples = set_up(config, accelerator)
    log = RunLog(config.output_dir, enabled=accelerator.is_main_process, report_to=config.report_to,
                 project_name=config.tracker_project_name)
    state = resume(config, run, log, accelerator)
    log.config(to_dict(config), describe(config, sources))

    # A fixed batch whose loss is measured before and after training (same noise and timesteps).
    fixed_batch = first_batch(run.data, state.epoch)
    loss_before = fixed_batch_loss(run.stage, run.model, fixed_batch, config.seed)
    validated = {}  # step -> validation metrics

    def save(state):
        path = save_checkpoint(accelerator, run_folder.checkpoints_dir(config.output_dir), state.global_step,
                               run.model, run.stage.trained_names(), run.optimizer, run.lr_scheduler,
                               state.to_checkpoint(log.history), config.checkpoints_total_limit, ema=run.ema)
        accelerator.print(f"saved {path}")

    def validate_at(step):
        with averaged(run.ema, run.params):  # --use-ema: validated with the average
            validated[step] = validate(run.stage, validation_samples, step, log, config, accelerator)

    step_times = train_loop(run, state, accelerator, log, save, validate_at, f"stage {config.stage}")
    if state.global_step not in validated:
        validate_at(state.global_step)
    with averaged(run.ema, run.params):  # the weights the model is saved with
        loss_after = fixed_batch_loss(run.stage, run.model, fixed_batch, config.seed)
    return finish(config, run, state, log, accelerator, validated[state.global_step], step_times,
                  {"wall_time_s": time.perf_counter() - started, "fixed_batch_loss_before": loss_before,
                   "fixed_batch_loss_after": loss_after})


def set_up(config, accelerator):
    """The stage with its models, the data, the optimiser and schedule, prepared by accelerate."""
    say = accelerator.print
    set_seed(config.seed)  # new layers' initial weights (the adapter's) are a function of the seed
    components = load_stage_components(config, say)
    stage = STAGES[config.stage](config, components, accelerator.device, say)
    condition_maker = condition_maker_for(config)
    cache = prepare_latent_cache(config, stage, components, condition_maker, accelerator) \
        if config.cache_latents else None
    model = place_models(config, stage, components, accelerator.device, encoders_on_device=cache is None)
    named = dict(model.named_parameters())
    params = [named[n] for n in stage.trained_names()]
    say(f"trained parameters: {count_parameters(params):,} in {len(params)} tensors")

    data = build_training_data(config, condition_maker, accelerator.process_index, accelerator.num_processes,
                               cache=cache)
    validation_samples = build_validation_set(config, condition_maker) if accelerator.is_main_process else []
    updates_per_epoch = (math.ceil(data.batches_per_epoch / config.gradient_accumulation_steps)
                         if data.batches_per_epoch else None)
    max_steps = config.max_train_steps or (updates_per_epoch * config.num_train_epochs if updates_per_epoch else None)
    say(f"data: {data.format}, {data.batches_per_epoch or 'unknown (streamed)'} batches of "
        f"{config.train_batch_size} per process and epoch, {accelerator.num_processes} process(es); "
        f"{max_steps or 'all'} optimiser steps")

    optimizer = make_optimizer(config, params)
    if max_steps is None and config.lr_scheduler not in ("constant", "constant_with_warmup"):
        raise ValueError(f"--lr-scheduler {config.lr_scheduler} needs a known length: give --max-train-steps "
                         f"(streamed shards have no length)")
    # Stepped once per optimiser step by the loop (not prepared): its state is the step count.
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=max_steps)
    if accelerator.distributed_type.value == "DEEPSPEED":  # the data loader is ours, not accelerate's
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.train_batch_size
    model, optimizer = accelerator.prepare(model, optimizer)
    if config.compile:
        model = torch.compile(model)
        stage.compile_frozen()
    ema = make_ema(config, params)
    if ema is not None:
        say(f"--use-ema: averaging the {len(params)} trained tensors, decay {config.ema_decay}; validation and "
            "the saved model use the average")
    run = Training(stage, model, params, optimizer, lr_scheduler, data, max_steps, config.num_train_epochs,
                   config.max_grad_norm, config.seed, config.logging_steps, config.checkpointing_steps,
                   config.validation_steps, ema=ema, set_grads_to_none=config.set_grads_to_none)
    return run, validation_samples


def place_models(config, stage, components, device, encoders_on_device=True):
    """Every model on the device; the frozen ones (text encoder, VAE, teacher, backbone) in eval mode and
    the run's low precision, what trains in fp32 (master weights). Returns the trained module.
    encoders_on_device=False (--cache-latents): the text encoders and the VAE's encoder stay on the CPU
    (validation takes them to the device for its duration); the VAE's decoder goes to the device."""
    weight_dtype = weight_dtype_of(config.mixed_precision)
    for part in (*components.text_encoders, components.vae):
        if part is not None:
            part.requires_grad_(False).eval()
    model = stage.trained_module()
    for frozen in [*components.text_encoders, components.vae, *stage.frozen_modules()]:
        if frozen is not None and frozen is not model:
            if encoders_on_device or not any(frozen is m for m in (*components.text_encoders, components.vae)):
                frozen.to(device)
            elif frozen is components.vae:
                place_vae_decoder(frozen, device)
            if weight_dtype != torch.float32:
                frozen.to(dtype=weight_dtype)
    model.to(device)
    if config.gradient_checkpointing:
        stage.enable_gradient_checkpointing()
    return model


def prepare_latent_cache(config, stage, components, condition_maker, accelerator):
    """--cache-latents: the cache checked against this run, built first where it is missing (resumed where
    it is partial; every process encodes its share), then the encoders it replaces set aside
    (elr_training/data/cache.py)."""
    cache = prepare_cache(config, components, condition_maker, accelerator.device, accelerator.print,
                          rank=accelerator.process_index, world_size=accelerator.num_processes,
                          wait=accelerator.wait_for_everyone, autocast=accelerator.autocast)
    set_encoders_aside(components, stage.needs_vae_encoder, accelerator.print)
    return cache


def resume(config, run, log, accelerator) -> LoopState:
    """The loop's position: fresh, or restored with the weights, optimiser and schedule from a checkpoint."""
    if not config.resume_from_checkpoint:
        return LoopState()
    checkpoints = run_folder.checkpoints_dir(config.output_dir)
    path = find_checkpoint(config.resume_from_checkpoint, checkpoints, accelerator.print)
    if path is None:
        accelerator.print(f"--resume-from-checkpoint latest: no checkpoint in {checkpoints} yet, starting fresh")
        return LoopState()
    state = LoopState.from_checkpoint(load_checkpoint(accelerator, path, run.model, run.optimizer, run.lr_scheduler,
                                                      ema=run.ema, trained_names=run.stage.trained_names()))
    for name, points in state.history.items():
        log.history[name] = [tuple(p) for p in points]
    accelerator.print(f"resumed from {path}: step {state.global_step}, epoch {state.epoch}, "
                      f"batch {state.batch_in_epoch} of the epoch")
    return state


def finish(config, run, state, log, accelerator, validation_metrics, step_times, numbers) -> dict:
    """Save the model, check that every process ends with the same weights, write metrics.json."""
    say = accelerator.print
    device = accelerator.device
    totals = accelerator.reduce(torch.tensor([state.skipped["image"], state.skipped["shard"]], device=device), "sum")
    # Every process must end with the same weights (DDP averages gradients): compare checksums.
    checksums = accelerator.gather(weights_checksum(run.params).to(device)[None]).cpu().tolist()
    if len({tuple(c) for c in checksums}) > 1:
        say(f"WARNING: the processes' weights differ: checksums {checksums}")
    model_dir = run_folder.model_dir(config.output_dir)
    if accelerator.is_main_process:
        with averaged(run.ema, run.params):
            run.stage.save(model_dir)
        say(f"saved the trained model to {model_dir}{' (the weight average, --use-ema)' if run.ema else ''}")
    accelerator.wait_for_everyone()

    metrics = {
        "stage": config.stage,
        "global_step": state.global_step,
        "wall_time_s": numbers["wall_time_s"],
        "s_per_it_median": float(np.median(step_times)) if step_times else None,
        "fixed_batch_loss_before": numbers["fixed_batch_loss_before"],
        "fixed_batch_loss_after": numbers["fixed_batch_loss_after"],
        "train_loss_first10": mean_of(log.history.get("train/loss", [])[:10]),
        "train_loss_last10": mean_of(log.history.get("train/loss", [])[-10:]),
        "skipped_images": int(totals[0]),
        "skipped_shards": int(totals[1]),
        "trained_parameters": count_parameters(run.params),
        "weights_checksum_per_process": checksums,
        "ema": None if run.ema is None else {"decay": run.ema.decay, "steps": run.ema.optimization_step,
                                             "last_decay": getattr(run.ema, "cur_decay_value", None)},
        **{k.replace("val/", "validation_"): v for k, v in validation_metrics.items()},
        "model_dir": model_dir,
        **run.stage.report(validation_metrics),
        "environment": environment(),
        "config": to_dict(config),
    }
    if accelerator.is_main_process:
        log.save_loss_curves()
        run_folder.write_metrics(config.output_dir, metrics)
        log.close()
        metrics["loss_history"] = {k: v for k, v in log.history.items() if k.startswith("train/loss")}
        say(f"stage {config.stage} done in {metrics['wall_time_s']:.0f} s: loss on a fixed batch "
            f"{metrics['fixed_batch_loss_before']:.4f} -> {metrics['fixed_batch_loss_after']:.4f}; "
            f"{summary_line(validation_metrics)}")
        say(run_folder.contents_line(config.output_dir))
        verdict = run.stage.verdict(validation_metrics)
        if verdict:
            say(verdict)
    return metrics


def load_stage_components(config, say):
    """The model parts the stage starts from (see elr_training/models.py for the folder layout)."""
    if isinstance(config, TeacherConfig):
        if config.pretrained:
            raise SystemExit(
                "stage 0 trains the tiny built-in teacher; a --pretrained model is already a teacher: "
                "use --stage 1 --pretrained ..."
            )
        say(f"tiny built-in configuration (elr_ext.tiny, {config.architecture or 'tiny'}), seed {config.seed}")
        return tiny_components(
            config.seed, config.architecture, prediction_type=config.prediction_type,
            beta_schedule=config.beta_schedule,
        )
    if isinstance(config, DistillConfig):
        if config.teacher:
            say(f"teacher: {config.teacher}")
            components = load_components(config.teacher, "--teacher", require_vae=False)
        else:
            say(f"teacher: the UNet of --pretrained {config.pretrained}")
            components = load_components(config.pretrained, "--pretrained", require_vae=True)
    elif config.backbone:
        say(f"backbone: {config.backbone}")
        components = load_components(config.backbone, "--backbone")
        if config.pretrained and components.vae is None:  # a backbone folder may leave the VAE to --pretrained
            components.vae = load_components(config.pretrained, "--pretrained", require_vae=True).vae
    else:
        say(f"backbone: the dense UNet of --pretrained {config.pretrained} (the paper's backbone is the stage-1 "
            f"student: pass --backbone to use one)")
        components = load_components(config.pretrained, "--pretrained", require_vae=True)
    if config.pretrained_vae:
        components.vae = load_vae(config.pretrained_vae, "--pretrained-vae")
        say(f"VAE: --pretrained-vae {config.pretrained_vae}")
    say(f"model family: {FAMILY_NAMES.get(components.family, components.family)} "
        f"({components.prediction_type} prediction, {len(components.text_encoders)} text encoder(s))")
    return components


# detect_family's names as a reader knows them
FAMILY_NAMES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL",
                "one-encoder": "a Stable Diffusion 1.x/2.x-shaped model"}


def validate(stage, samples, step, log, config, accelerator) -> dict:
    """The validation grid and metrics on the main process (the others wait); returns the metrics."""
    metrics = {}
    if accelerator.is_main_process:
        # frozen parts in the low precision, trained ones in fp32; --cache-latents: encoders visit the device
        with accelerator.autocast(), encoders_for_validation(stage.components, accelerator.device,
                                                             enabled=bool(config.cache_latents)):
            pictures, metrics = stage.validate(samples, step)
        if isinstance(pictures, np.ndarray):
            pictures = {"grid": pictures}
        for name, picture in pictures.items():  # "grid": the held-out scenes; "pairs": --validation-image
            run_folder.save_validation_grid(config.output_dir, picture, step, name)
            log.image(f"validation/{name}", picture, step)
        log.scalars(metrics, step)
        log.flush()
        accelerator.print(f"validation at step {step}: {summary_line(metrics)}")
    accelerator.wait_for_everyone()
    return metrics


PLAN_CHILD = "ELR_PLAN_CHILD"  # set in the process plan_in_child runs


def plan_in_child(argv) -> None:
    """Run the plan in a child process of this script, again when torch kills it (SIGABRT or SIGSEGV;
    torch 2.14.1's fake tensors sometimes corrupt the heap: docs/planning.md), up to
    elr_ext.plan.PLAN_TRIES runs; exit with the child's status, 1 when every run was killed."""
    from elr_ext.plan import crash_signal, run_plan_process

    def said(attempt: int, tries: int, name: str) -> None:
        print(f"train.py --plan: the planning process died inside torch ({name}, try {attempt} of {tries}; "
              f"docs/planning.md){'; trying again' if attempt < tries else ''}", file=sys.stderr, flush=True)

    done = run_plan_process([sys.executable, os.path.abspath(__file__), *argv], on_crash=said,
                            env=dict(os.environ, **{PLAN_CHILD: "1"}))
    sys.exit(1 if crash_signal(done.returncode) else done.returncode)


def end_after_plan() -> None:
    """Leave the process at once after a plan. On torch 2.14.1 a process that ran a step under
    FakeTensorMode sometimes aborts in the interpreter's teardown ("corrupted double-linked list"),
    after everything was printed and written; the plan's numbers do not change between runs. Tests
    and benchmarks therefore run plans in their own processes."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def summary_line(metrics: dict) -> str:
    return ", ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in metrics.items() if v is not None) or \
        "no validation metrics"


if __name__ == "__main__":
    from elr_training.cli import run_cli

    run_cli(main, "train.py")
