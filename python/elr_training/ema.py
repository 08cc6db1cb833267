"""--use-ema: an exponential moving average of the trained tensors (and only those: the adapter's
trainable subset in stage 2, the student in stage 1), kept by diffusers' EMAModel.

After optimiser step k (k = 1, 2, ...) every averaged tensor e is updated from the weights w:

    e <- d_k e + (1 - d_k) w,   d_k = min(decay, (1 + (k - 1)) / (10 + (k - 1))),   d_1 = 0

so e starts as the first step's weights and the decay warms up towards --ema-decay. Validation and
the saved model use the average (`averaged`); a checkpoint holds the raw weights in model.safetensors
(what the optimiser continues from) and the average in ema.safetensors with its step count in
ema.json (`save` / `load`), so a resumed run continues both as an unbroken one would.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import List, Optional

import torch
from safetensors.torch import load_file, save_file

EMA_WEIGHTS = "ema.safetensors"
EMA_STATE = "ema.json"


def make_ema(config, params: List[torch.nn.Parameter]):
    """diffusers' EMAModel over `params` with --ema-decay, or None without --use-ema."""
    if not config.use_ema:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=config.ema_decay)


@contextlib.contextmanager
def averaged(ema, params: List[torch.nn.Parameter]):
    """The averaged weights in `params` for the block (validation, saving), the raw ones after it.
    Without EMA (ema None) the block sees the raw weights."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def save(ema, names: List[str], folder: str) -> None:
    """The average as ema.safetensors (keyed like model.safetensors) and its state as ema.json."""
    tensors = {name: shadow.detach().float().cpu().contiguous().clone() for name, shadow in zip(names, ema.shadow_params)}
    save_file(tensors, os.path.join(folder, EMA_WEIGHTS))
    state = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
    with open(os.path.join(folder, EMA_STATE), "w") as f:
        json.dump(state, f, indent=2)


def has_ema(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, EMA_STATE))


def load(ema, names: List[str], folder: str) -> None:
    """Restores what `save` wrote into `ema` (its tensors keep their device and dtype)."""
    with open(os.path.join(folder, EMA_STATE)) as f:
        state = json.load(f)
    tensors = load_file(os.path.join(folder, EMA_WEIGHTS))
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"checkpoint {folder}: {EMA_WEIGHTS} lacks the averages of {missing[:5]}")
    with torch.no_grad():
        for name, shadow in zip(names, ema.shadow_params):
            shadow.copy_(tensors[name].to(shadow.dtype))
    ema.load_state_dict({k: v for k, v in state.items() if k != "shadow_params"})


def damage(folder: str) -> Optional[str]:
    """Why a checkpoint's EMA files cannot be read ('<file>: <reason>'), or None (also when it has none)."""
    if not has_ema(folder):
        return None
    from safetensors import safe_open

    try:
        with open(os.path.join(folder, EMA_STATE)) as f:
            json.load(f)
    except (OSError, ValueError) as error:
        return f"{EMA_STATE}: {error}"
    try:
        with safe_open(os.path.join(folder, EMA_WEIGHTS), framework="pt") as f:
            f.keys()
    except Exception as error:  # SafetensorError for a damaged header, OSError for a missing file
        return f"{EMA_WEIGHTS}: {error}"
    return None
