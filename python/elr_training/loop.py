"""The training loop, in one place for every stage: it knows the Stage interface (loss of a batch),
accelerate, the optimiser and the schedule, and nothing of what a stage trains.

Its position (optimiser steps, epoch, batch within the epoch, micro-steps, skipped samples, the
logged history) is a LoopState, which checkpoints store and --resume-from-checkpoint restores, so a
resumed run continues where an unbroken one would be. Every random draw of a micro-batch comes from
a generator seeded by (seed, micro-step, process).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from tqdm.auto import tqdm


@dataclass
class LoopState:
    global_step: int = 0  # optimiser steps done
    epoch: int = 0
    batch_in_epoch: int = 0
    micro_step: int = 0  # batches drawn (gradient accumulation: several per optimiser step)
    skipped: Dict[str, int] = field(default_factory=lambda: {"image": 0, "shard": 0})
    history: Dict[str, list] = field(default_factory=dict)

    @classmethod
    def from_checkpoint(cls, state: dict) -> "LoopState":
        return cls(state["global_step"], state["epoch"], state["batch_in_epoch"], state["micro_step"],
                   state["skipped"], state.get("history", {}))

    def to_checkpoint(self, history: Dict[str, list]) -> dict:
        """What a checkpoint stores (global_step is stored by the checkpoint itself)."""
        state = asdict(self)
        del state["global_step"]
        state["history"] = {k: list(v) for k, v in history.items()}
        return state


@dataclass
class Training:
    """What the loop runs: the stage's loss through the prepared model, the optimiser and schedule,
    the data, and when to log, checkpoint and validate."""

    stage: object  # elr_training.stages.Stage
    model: torch.nn.Module  # the prepared trained module
    params: List[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    data: object  # elr_training.data.TrainingData
    max_steps: Optional[int]
    num_train_epochs: Optional[int]
    max_grad_norm: float
    seed: int
    logging_steps: int
    checkpointing_steps: int
    validation_steps: int
    ema: object = None  # diffusers' EMAModel over params (--use-ema), stepped after every optimiser step
    set_grads_to_none: bool = True  # --set-grads-to-none: optimizer.zero_grad(set_to_none=...)


def hash_seed(seed: int, step: int, rank: int) -> int:
    """Independent streams per (seed, micro-step, process) from numpy's SeedSequence."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0] % (2**63))


def train_loop(run: Training, state: LoopState, accelerator, log, save_checkpoint: Callable[[LoopState], None],
               validate: Callable[[int], None], description: str) -> List[float]:
    """Optimiser steps until max_steps (or num_train_epochs), calling save_checkpoint(state) and
    validate(step) at their cadence and at the last step. Returns the seconds of every step."""
    say = accelerator.print
    progress = tqdm(total=run.max_steps, initial=state.global_step, desc=description,
                    disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    step_times: List[float] = []
    done = run.max_steps is not None and state.global_step >= run.max_steps
    while not done:
        run.data.start_epoch(state.epoch, state.batch_in_epoch)
        tick = time.perf_counter()
        for batch in run.data.loader:
            state.batch_in_epoch += 1
            for marker in batch["skipped"]:
                state.skipped[marker.kind] += 1
                say(f"skipped {marker.kind} {marker.where}: {marker.reason}")
            logs = micro_step(run, state, accelerator, batch)
            if not accelerator.sync_gradients:
                continue

            # ---- one optimiser step done
            run.lr_scheduler.step()
            if run.ema is not None:
                run.ema.step(run.params)
            state.global_step += 1
            step = state.global_step
            step_times.append(time.perf_counter() - tick)
            tick = time.perf_counter()
            lr = run.lr_scheduler.get_last_lr()[0]
            progress.update(1)
            progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{lr:.2e}", s_per_it=f"{step_times[-1]:.2f}")
            if step % run.logging_steps == 0:
                log.scalars({f"train/{k}": v for k, v in logs.items()}
                            | {"train/lr": lr, "train/s_per_it": step_times[-1]}, step)
            done = run.max_steps is not None and step >= run.max_steps
            if run.checkpointing_steps and (step % run.checkpointing_steps == 0 or done):
                save_checkpoint(state)
            if run.validation_steps and (step % run.validation_steps == 0 or done):
                validate(step)
            if done:
                break
        else:  # the epoch ran out
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            if run.max_steps is None and state.epoch >= run.num_train_epochs:
                done = True
    progress.close()
    return step_times


def micro_step(run: Training, state: LoopState, accelerator, batch: dict) -> Dict[str, float]:
    """Forward, backward and (when accelerate syncs gradients) the optimiser step of one micro-batch."""
    generator = torch.Generator().manual_seed(hash_seed(run.seed, state.micro_step, accelerator.process_index))
    state.micro_step += 1
    with accelerator.accumulate(run.model):
        with accelerator.autocast():
            if batch["n"] > 0:
                loss, logs = run.stage.loss(run.model, batch, generator)
            else:  # every sample unreadable: a zero loss keeps the processes' steps in line
                loss, logs = sum((p * 0).sum() for p in run.params), {"loss": float("nan")}
        accelerator.backward(loss)
        if accelerator.sync_gradients and run.max_grad_norm > 0:
            accelerator.clip_grad_norm_(run.params, run.max_grad_norm)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=run.set_grads_to_none)
    return logs


def first_batch(data, epoch: int) -> dict:
    """The first readable batch of the epoch (for the before/after loss)."""
    data.start_epoch(epoch, 0)
    for batch in data.loader:
        if batch["n"] > 0:
            return batch
    raise RuntimeError("no readable sample in the training data")


def fixed_batch_loss(stage, model, batch: dict, seed: int) -> float:
    """The loss of `batch` with the same noise and timesteps every time (measured before and after)."""
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


def mean_of(points) -> Optional[float]:
    values = [v for _, v in points if not math.isnan(v)]
    return float(np.mean(values)) if values else None
