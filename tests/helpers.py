"""Shared test helpers: the tolerance rule (docs/testing.md, "The tolerance rule"; kept in
elr_ext/testing.py, which the GPU check uses too) and the backends to run."""

from __future__ import annotations

import contextlib
import math

import torch

import elr_ext
from elr_ext import reference
from elr_ext.ops.fdn import fdn_forward
from elr_ext.testing import assert_close_to_ref  # noqa: F401  (the tests import it from here)


def cpu_backends() -> list:
    """Every backend that runs on CPU tensors here (torch always; cpu when compiled; triton under
    TRITON_INTERPRET=1)."""
    return elr_ext.available_backends("cpu")


# (N, C, H, W, G, broadcast): FDN inputs whose groups are empty, by H * W == 0 or by C == 0.
EMPTY_FDN_CASES = [(2, 4, 0, 3, 2, False), (2, 4, 3, 0, 4, True), (1, 6, 0, 0, 3, True), (2, 0, 3, 3, 1, True)]


def check_fdn_on_empty_groups(backend, case, dtype, activation, eps, context=contextlib.nullcontext, device="cpu"):
    """FDN on empty groups on `backend` (inside `context()`): an empty output in z's dtype; the
    statistics of a constant, mean 0 and rstd 1/sqrt(eps) (fp64, rounded once to the accumulation
    dtype), bit for bit what reference.group_stats gives; an empty dz and zero (broadcast) or empty
    (full-size) dgamma, dbeta."""
    n, c, h, w, groups, broadcast = case
    aff = (n, c, 1, 1) if broadcast else (n, c, h, w)
    z = torch.randn(n, c, h, w, dtype=dtype, device=device, requires_grad=True)
    gamma = torch.randn(aff, dtype=dtype, device=device, requires_grad=True)
    beta = torch.randn(aff, dtype=dtype, device=device, requires_grad=True)
    with elr_ext.use_backend(backend), context():
        out, mean, rstd = fdn_forward(z.detach(), gamma.detach(), beta.detach(), groups, eps, activation or "none")
        y = elr_ext.fdn(z, gamma, beta, num_groups=groups, eps=eps, activation=activation)
        dz, dgamma, dbeta = torch.autograd.grad(y, (z, gamma, beta), torch.zeros_like(y))
    acc = reference.accumulation_dtype(dtype)
    assert out.shape == z.shape and out.dtype == dtype and y.shape == z.shape and y.dtype == dtype
    assert torch.equal(mean, torch.zeros(n, groups, dtype=acc, device=device)), mean
    assert torch.equal(rstd, torch.full((n, groups), 1 / math.sqrt(eps), dtype=acc, device=device)), rstd
    ref_mean, ref_rstd = reference.group_stats(z.detach(), groups, eps)
    assert torch.equal(mean, ref_mean) and torch.equal(rstd, ref_rstd)
    assert dz.shape == z.shape
    for g in (dgamma, dbeta):
        assert g.shape == gamma.shape and g.dtype == dtype and torch.count_nonzero(g) == 0


def perturb_zero_inits(adapter, scale: float = 0.05) -> None:
    """Give a LocalControlAdapter's zero-initialised trainable tensors (zero convs, the Kronecker U
    factors) small random values, so that its output depends on every trainable parameter."""
    with torch.no_grad():
        for _, p in adapter.named_trainable_parameters():
            if not p.any():
                p.normal_(0, scale)


def read_wandb_records(path):
    """The records of a wandb run file (run-<id>.wandb, what WANDB_MODE=offline writes), as
    wandb.proto Record messages. The file is LevelDB's log format: a 7-byte header (':W&B', magic
    0xBEE1, version 0), then 32 KiB blocks of chunks (crc32 4 bytes, length 2, type 1: full, first,
    middle, last), a block's last < 7 bytes padding."""
    import struct

    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", f"{path}: not a wandb run file"
    block, records, pending, offset = 32768, [], b"", 7
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # block trailer
            offset += block - offset % block
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
        chunk = data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind == 0 and length == 0:
            break
        pending += chunk
        if kind in (1, 4):  # full or last chunk: a record is complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records
