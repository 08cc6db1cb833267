"""Training checkpoints: written whole or not at all, read back without unpickling code.

A checkpoint is a folder checkpoints/checkpoint-<step>/ holding

    model.safetensors        the trained weights (what the stage optimises, fp32)
    optimizer.pt             optimiser state_dict   (torch.save; read with torch.load(weights_only=True))
    lr_scheduler.pt          lr-scheduler state_dict (same)
    rng_state_<rank>.*       torch (CPU, CUDA) RNG (.safetensors), numpy and python RNG (.json), per process
    state.json               global step, epoch, batches consumed in the epoch, skipped-data counts
    ema.safetensors, ema.json with --use-ema: the averaged trained weights and the average's step count
                             (elr_training.ema); model.safetensors keeps the raw weights

It is written to checkpoint-<step>.tmp first and renamed when complete (a rename within one folder
is atomic), so a crash leaves either the previous checkpoints or a .tmp folder that is ignored and
removed by the next save, never a half checkpoint that --resume would pick.

With DeepSpeed the optimiser state is partitioned over processes; there accelerate's save_state /
load_state writes and reads the partitions (DeepSpeed's own format) inside the same atomic folder.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import ema as ema_files
from .models import unwrap

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(folder: str) -> list:
    """Complete checkpoints in `folder`, oldest first (.tmp folders are not checkpoints)."""
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(folder) if (m := CHECKPOINT_PATTERN.match(name))]
    return [os.path.join(folder, name) for _, name in sorted(found)]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: names the file, the checkpoint and what to do instead."""


def damage(path: str) -> Optional[str]:
    """Why the checkpoint folder `path` cannot be resumed from ('<file>: <reason>'), or None when every
    file it needs is there and readable: state.json parses, model.safetensors' header and sizes
    agree, the .pt files end in a zip directory. Cheap: only headers and directories are read."""
    import zipfile

    from safetensors import safe_open

    state_path = os.path.join(path, "state.json")
    try:
        with open(state_path) as f:
            state = json.load(f)
        if not isinstance(state, dict) or "global_step" not in state:
            return "state.json: no global_step in it"
    except (OSError, ValueError) as error:
        return f"state.json: {error}"
    weights = os.path.join(path, "model.safetensors")
    try:
        with safe_open(weights, framework="pt") as f:
            f.keys()
    except Exception as error:  # safetensors raises its own SafetensorError for damaged headers
        return f"model.safetensors: {error}"
    needed = ["lr_scheduler.pt"] + ([] if os.path.isdir(os.path.join(path, "deepspeed")) else ["optimizer.pt"])
    for name in needed:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{name}: missing"
        if not zipfile.is_zipfile(file):  # a truncated or overwritten archive has no zip directory at its end
            return f"{name}: not a complete torch.save archive"
    return ema_files.damage(path)


def find_checkpoint(spec: str, folder: str, say=print) -> Optional[str]:
    """--resume-from-checkpoint: 'latest' (None when there is none yet) or an explicit folder.

    'latest' skips damaged checkpoints, newest first, saying which and why, and resumes from the newest
    complete one. An explicit damaged checkpoint is an error that names the file and offers the
    newest complete checkpoint before it."""
    if spec == "latest":
        found = list_checkpoints(folder)
        for path in reversed(found):
            problem = damage(path)
            if problem is None:
                return path
            say(f"--resume-from-checkpoint latest: {path} is damaged ({problem}); trying the one before it")
        if found:
            raise CheckpointError(
                f"--resume-from-checkpoint latest: every checkpoint in {folder} is damaged; remove them "
                f"to start fresh"
            )
        return None
    if not os.path.isfile(os.path.join(spec, "state.json")):
        raise FileNotFoundError(f"--resume-from-checkpoint {spec}: not a checkpoint (no state.json in it)")
    problem = damage(spec)
    if problem is not None:
        parent = os.path.dirname(os.path.abspath(spec))
        match = CHECKPOINT_PATTERN.match(os.path.basename(os.path.normpath(spec)))
        step = int(match.group(1)) if match else None
        earlier = [p for p in list_checkpoints(parent) if step is None or _step(p) < step]
        complete = next((p for p in reversed(earlier) if damage(p) is None), None)
        offer = (f"; the newest complete one before it is {complete}" if complete
                 else "; no complete checkpoint before it")
        raise CheckpointError(f"--resume-from-checkpoint {spec}: damaged, {problem}{offer}")
    return spec


def _step(path: str) -> int:
    return int(CHECKPOINT_PATTERN.match(os.path.basename(path)).group(1))


def trained_state(model: torch.nn.Module, names: list) -> dict:
    """The named trained parameters as contiguous fp32 CPU tensors (safetensors refuses shared storage)."""
    params = dict(model.named_parameters())
    return {name: params[name].detach().float().cpu().contiguous().clone() for name in names}


def save_checkpoint(
    accelerator,
    folder: str,
    step: int,
    model,
    trained_names: list,
    optimizer,
    lr_scheduler,
    state: dict,
    total_limit: Optional[int] = None,
    ema=None,
) -> str:
    """Every process calls this (each saves its RNG); the main process writes the rest and renames.
    `ema` (elr_training.ema, --use-ema) adds the averaged weights."""
    final = os.path.join(folder, f"checkpoint-{step}")
    tmp = final + ".tmp"
    if accelerator.is_main_process:
        os.makedirs(folder, exist_ok=True)
        for name in os.listdir(folder):  # what an interrupted save left behind
            if name.endswith(".tmp"):
                shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()

    _save_rng(tmp, accelerator.process_index)
    deepspeed = accelerator.distributed_type.value == "DEEPSPEED"
    if deepspeed:
        accelerator.save_state(os.path.join(tmp, "deepspeed"))
    if accelerator.is_main_process:
        unwrapped = unwrap(model)
        save_file(trained_state(unwrapped, trained_names), os.path.join(tmp, "model.safetensors"))
        if not deepspeed:
            torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save(lr_scheduler.state_dict(), os.path.join(tmp, "lr_scheduler.pt"))
        if ema is not None:
            ema_files.save(ema, trained_names, tmp)
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({**state, "global_step": step, "num_processes": accelerator.num_processes}, f, indent=2)
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        if os.path.isdir(final):  # the same step saved again (e.g. a re-run): replace it
            shutil.move(final, final + ".old.tmp")
        os.replace(tmp, final)
        shutil.rmtree(final + ".old.tmp", ignore_errors=True)
        if total_limit is not None and total_limit > 0:
            for old in list_checkpoints(folder)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_trained_weights(model, path: str) -> None:
    """Copies a checkpoint's model.safetensors (the trained parameters) into `model`, in place."""
    file = os.path.join(path, "model.safetensors")
    try:
        weights = load_file(file)
    except Exception as error:  # SafetensorError, OSError: name the file
        raise CheckpointError(f"checkpoint {path}: cannot read {file}: {error}") from error
    params = dict(model.named_parameters())
    missing = sorted(set(weights) - set(params))
    if missing:
        raise ValueError(f"checkpoint {path} holds parameters this model does not have: {missing[:5]} ...")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].dtype))


def load_checkpoint(accelerator, path: str, model, optimizer, lr_scheduler, ema=None, trained_names=None) -> dict:
    """Restores weights, optimiser, lr scheduler, this process's RNG and (given `ema` and the trained
    names) the weight average; returns state.json."""
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    if state.get("num_processes", 1) != accelerator.num_processes:
        accelerator.print(
            f"note: {path} was written by {state.get('num_processes')} process(es), resuming with "
            f"{accelerator.num_processes}: the data order after this point differs from an unbroken run"
        )
    load_trained_weights(unwrap(model), path)
    if accelerator.distributed_type.value == "DEEPSPEED":
        accelerator.load_state(os.path.join(path, "deepspeed"))
    else:
        optimizer.load_state_dict(
            torch.load(os.path.join(path, "optimizer.pt"), weights_only=True, map_location="cpu")
        )
    lr_scheduler.load_state_dict(torch.load(os.path.join(path, "lr_scheduler.pt"), weights_only=True))
    _load_rng(path, accelerator.process_index)
    if ema is not None:
        if ema_files.has_ema(path):
            ema_files.load(ema, trained_names, path)
        else:
            accelerator.print(f"note: {path} holds no weight average (saved without --use-ema): the average "
                              "starts from the resumed weights")
            params = dict(unwrap(model).named_parameters())
            with torch.no_grad():
                for name, shadow in zip(trained_names, ema.shadow_params):
                    shadow.copy_(params[name])
    elif ema_files.has_ema(path):
        accelerator.print(f"note: {path} holds a weight average; without --use-ema it is not used")
    return state


def _save_rng(folder: str, rank: int) -> None:
    tensors = {"torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    save_file(tensors, os.path.join(folder, f"rng_state_{rank}.safetensors"))
    np_state = np.random.get_state()
    py_state = random.getstate()
    with open(os.path.join(folder, f"rng_state_{rank}.json"), "w") as f:
        json.dump(
            {
                "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
                "python": [py_state[0], list(py_state[1]), py_state[2]],
            },
            f,
        )


def _load_rng(folder: str, rank: int) -> None:
    path = os.path.join(folder, f"rng_state_{rank}.safetensors")
    if not os.path.isfile(path):  # resumed with more processes than saved: the new ones keep their seed
        return
    tensors = load_file(path)
    torch.random.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        states = [tensors[f"cuda_{i}"] for i in range(torch.cuda.device_count()) if f"cuda_{i}" in tensors]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    with open(os.path.join(folder, f"rng_state_{rank}.json")) as f:
        saved = json.load(f)
    kind, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))
