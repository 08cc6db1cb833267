"""torch.compile of the tiny Stage II training step: adapter forward (Kronecker LoRA linears and
convs, fused FDN), frozen UNet forward with the adapter's residuals, loss, backward, AdamW step.

- torch._dynamo.explain over the whole step: no graph break has a frame in elr_ext (the one break
  there is, `loss.backward()`, is the step's own: Dynamo does not trace backward calls). The
  Python backward functions of elr_ext's autograd, which the autograd engine calls inside the
  compiled region, are traced too and must not break either.
- the step as a training loop compiles it (forward + loss with fullgraph=True, so AOTAutograd
  also traces elr_ext's backward formulas into the backward graph; the optimiser step compiled
  on its own), run against eager from the same initial state: losses and updated parameters agree.

The backend is aot_eager (Dynamo, fake-tensor tracing of the custom ops, AOTAutograd's joint graph
and partition: everything elr_ext must support) unless ELR_EXT_COMPILE_BACKEND says otherwise;
inductor's C++ code generation alone takes minutes on a small CI machine (251 s for the first
inductor step on 2 CPU cores, with the same loss as eager to 1e-6).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from elr_ext.nn import LocalControlAdapter  # noqa: E402
from elr_ext.tiny import tiny_unet  # noqa: E402

BACKEND = os.environ.get("ELR_EXT_COMPILE_BACKEND", "aot_eager")
STEPS = 2


# tiny_unet cut to two levels (tracing time scales with the layers): still a plain and a
# cross-attention down block, both up-block kinds and the cross-attention mid block.
TWO_LEVELS = dict(block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))


def build():
    """Frozen tiny UNet, a Kronecker adapter on it and AdamW, from a fixed seed. The zero convs (and
    any zero-initialised factor) are perturbed so that every elr_ext op has a non-zero gradient."""
    torch.manual_seed(0)
    unet = tiny_unet(**TWO_LEVELS).requires_grad_(False).eval()
    adapter = LocalControlAdapter.from_unet(unet, condition_channels=3, terms=2, rank=2)
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.02)
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-3)
    return unet, adapter, optimizer


def batches(n):
    generator = torch.Generator().manual_seed(1)
    def batch():
        sample = torch.randn(2, 3, 32, 32, generator=generator)
        timestep = torch.randint(0, 1000, (2,), generator=generator)
        text = torch.randn(2, 8, 32, generator=generator)
        condition = torch.rand(2, 3, 32, 32, generator=generator)
        return sample, timestep, text, condition, torch.randn(2, 3, 32, 32, generator=generator)

    return [batch() for _ in range(n)]


def make_step(unet, adapter, optimizer, compiled: bool):
    def forward_loss(sample, t, text, condition, target):
        down, mid = adapter(sample, t, text, condition)
        eps = unet(sample, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                   mid_block_additional_residual=mid).sample
        return F.mse_loss(eps, target)

    optimizer_step = optimizer.step
    if compiled:
        forward_loss = torch.compile(forward_loss, fullgraph=True, backend=BACKEND)
        optimizer_step = torch.compile(optimizer.step, backend=BACKEND)

    def step(*batch):
        loss = forward_loss(*batch)
        loss.backward()
        optimizer_step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def test_no_graph_break_in_elr_ext():
    torch._dynamo.reset()
    step = make_step(*build(), compiled=False)
    explanation = torch._dynamo.explain(step)(*batches(1)[0])
    in_elr_ext = [(reason.reason.splitlines()[0], [f"{f.filename}:{f.lineno}" for f in reason.user_stack])
                  for reason in explanation.break_reasons
                  if any(f"{os.sep}elr_ext{os.sep}" in f.filename for f in reason.user_stack)]
    assert not in_elr_ext, in_elr_ext
    # the forward (adapter, UNet, loss) is one graph: the breaks are the step's own backward call
    for reason in explanation.break_reasons:
        assert reason.user_stack[-1].filename == __file__, reason.reason


def test_compiled_step_matches_eager():
    torch._dynamo.reset()
    data = batches(STEPS)
    eager_unet, eager_adapter, eager_opt = build()
    eager_step = make_step(eager_unet, eager_adapter, eager_opt, compiled=False)
    eager_losses = [eager_step(*b) for b in data]

    unet, adapter, optimizer = build()
    step = make_step(unet, adapter, optimizer, compiled=True)
    losses = [step(*b) for b in data]

    for i, (loss, ref) in enumerate(zip(losses, eager_losses)):
        assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-6), (i, loss.item(), ref.item())
    for (name, p), q in zip(adapter.named_trainable_parameters(), eager_adapter.trainable_parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6), f"{name} after {STEPS} steps"
