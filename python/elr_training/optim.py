"""The optimiser of a stage (--optimizer) and the memory its state holds.

    adamw       torch.optim.AdamW: two fp32 moments per parameter (8 bytes per trained value).
    adamw8bit   bitsandbytes.optim.AdamW8bit (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
                Quantization"): the same update with the moments stored in 8 bits, about 2 bytes per
                trained value; bitsandbytes >= 0.50 runs it on CPU tensors as well as on GPUs.
"""

from __future__ import annotations

import torch

OPTIMIZERS = ("adamw", "adamw8bit")


def make_optimizer(config, params) -> torch.optim.Optimizer:
    """The optimiser that config.optimizer names, over `params`, with the config's AdamW
    hyper-parameters (learning_rate, adam_beta1/2, adam_weight_decay, adam_epsilon).

    "adamw8bit" keeps bitsandbytes' defaults otherwise (block-wise quantisation, min_8bit_size
    4096). Its state per parameter tensor of n >= 4096 values:
      - state1, state2: the two moments as uint8 tensors of the parameter's shape (2n bytes);
      - absmax1, absmax2: one fp32 scale per 256-value block (2 x 4 x ceil(n / 256) bytes);
      - qmap1, qmap2: the 256-value fp32 code books of the signed and the unsigned moment, one pair
        shared by every parameter of the optimiser (2 KiB in all);
      - step: a Python int.
    Tensors under 4096 values (biases, norms) keep two fp32 moments instead (8n bytes), where
    quantising would save little.
    """
    kwargs = dict(lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                  weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if config.optimizer == "adamw8bit":
        return _bitsandbytes_optim().AdamW8bit(params, **kwargs)
    raise ValueError(f"--optimizer must be one of {list(OPTIMIZERS)}, got {config.optimizer!r}")


def _bitsandbytes_optim():
    """bitsandbytes.optim, imported only when the 8-bit optimiser is asked for: plain AdamW runs
    without the package."""
    try:
        import bitsandbytes.optim
    except ImportError as error:
        raise ImportError(
            "--optimizer adamw8bit needs bitsandbytes (>= 0.50 for CPU tensors): pip install bitsandbytes "
            f"(or the 'train' extra: pip install -e '.[train]'); import failed: {error}"
        ) from error
    return bitsandbytes.optim


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of every tensor in optimizer.state (moments, scales, code books, step counters).

    A tensor that several parameters' states share (bitsandbytes' qmaps) is counted once, by its
    storage: the figure is the memory the state holds, not the sum of what each entry references."""
    seen = set()
    total = 0
    for tensor in state_tensors(optimizer.state):
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), tensor.device)
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def state_tensors(value):
    """Every tensor in an optimiser state, however nested in dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from state_tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from state_tensors(item)
