"""LocalControlAdapter (Stage II, section 2.4) on the tiny configuration: zero residuals at init, which
parameters train, parameter counts, decomposed backbones, save/load, merge, several conditions and
the input errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")

import elr_ext  # noqa: E402
from elr_ext import tiny  # noqa: E402
from elr_ext.nn.control_adapter import FDNResnetBlock, LocalControlAdapter  # noqa: E402
from elr_ext.nn.kron_lora import kronecker_splits  # noqa: E402
from helpers import perturb_zero_inits  # noqa: E402

TERMS, RANK = 4, 8
CHANNELS = [1, 3]  # an edge map and an RGB segmentation map


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return tiny.tiny_unet().requires_grad_(False)


@pytest.fixture(scope="module")
def decomposed_unet():
    torch.manual_seed(1)
    unet = tiny.tiny_unet().requires_grad_(False)
    elr_ext.decompose(unet, rank_ratio=1 / 3)
    return unet


def inputs(batch=2, size=32, latent_channels=3):
    return dict(sample=torch.randn(batch, latent_channels, size, size), timestep=torch.randint(0, 1000, (batch,)),
                encoder_hidden_states=torch.randn(batch, 8, 32),
                condition=[(torch.rand(batch, 1, size, size) > 0.8).float(), torch.rand(batch, 3, size, size)])


def expected_trainable(name: str, mode: str) -> bool:
    """Which parameters train, decided from the names alone (independently of the adapter's list)."""
    if mode == "full":
        return True
    return (name.rsplit(".", 1)[-1] in ("A", "U", "V") or ".fdn1." in name or ".fdn2." in name
            or name.startswith(("feature_extractor.", "down_zero_convs.", "mid_zero_conv.")))


@pytest.mark.parametrize("mode", ["kron", "full"])
def test_residuals_are_zero_at_init_and_leave_the_unet_unchanged(unet, mode):
    adapter = LocalControlAdapter.from_unet(unet, condition_channels=CHANNELS, adapter=mode, terms=TERMS, rank=RANK)
    x = inputs()
    down, mid = adapter(**x)
    with torch.no_grad():
        plain = unet(x["sample"], x["timestep"], x["encoder_hidden_states"]).sample
        # the residuals line up one to one with the UNet's own skip tensors
        hooked = []
        handle = unet.mid_block.register_forward_hook(lambda m, i, o: hooked.append(o))
        controlled = unet(x["sample"], x["timestep"], x["encoder_hidden_states"],
                          down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        handle.remove()
    assert len(down) == 1 + sum(len(b.resnets) + len(b.downsamplers or []) for b in unet.down_blocks)
    assert mid.shape == hooked[0].shape
    assert all(torch.count_nonzero(r) == 0 for r in down) and torch.count_nonzero(mid) == 0
    assert torch.equal(controlled, plain)


@pytest.mark.parametrize("mode", ["kron", "full"])
def test_one_step_changes_exactly_the_trainable_parameters(unet, mode):
    adapter = LocalControlAdapter.from_unet(unet, condition_channels=CHANNELS, adapter=mode, terms=TERMS, rank=RANK)
    perturb_zero_inits(adapter)
    names = [n for n, _ in adapter.named_trainable_parameters()]
    assert names == [n for n, p in adapter.named_parameters() if expected_trainable(n, mode)]
    assert [p for p in adapter.parameters() if p.requires_grad] == adapter.trainable_parameters()

    before = {n: p.detach().clone() for n, p in adapter.named_parameters()}
    backbone = {n: p.detach().clone() for n, p in unet.named_parameters()}
    optimizer = torch.optim.SGD([p for p in adapter.parameters() if p.requires_grad], lr=0.1)
    x = inputs()
    down, mid = adapter(**x)
    pred = unet(x["sample"], x["timestep"], x["encoder_hidden_states"], down_block_additional_residuals=down,
                mid_block_additional_residual=mid).sample
    torch.nn.functional.mse_loss(pred, torch.randn_like(pred)).backward()
    optimizer.step()

    changed = {n for n, p in adapter.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(names), f"changed but frozen: {sorted(changed - set(names))[:5]}; " \
                                  f"trainable but unchanged: {sorted(set(names) - changed)[:5]}"
    assert all(torch.equal(p, backbone[n]) for n, p in unet.named_parameters())
    assert all(p.grad is None for p in unet.parameters())


def test_first_step_from_init_reaches_the_output_zero_convs(unet):
    # At init only the output zero convs get a gradient (everything before them is multiplied by 0).
    adapter = LocalControlAdapter.from_unet(unet, condition_channels=CHANNELS)
    x = inputs()
    down, mid = adapter(**x)
    pred = unet(x["sample"], x["timestep"], x["encoder_hidden_states"], down_block_additional_residuals=down,
                mid_block_additional_residual=mid).sample
    pred.square().mean().backward()
    assert all(conv.weight.grad.abs().sum() > 0 for conv in adapter.down_zero_convs)
    assert adapter.mid_zero_conv.weight.grad.abs().sum() > 0


def kron_factor_count(layer: nn.Module) -> int:
    d_out = layer.weight.shape[0]
    d_in = layer.weight[0].numel()
    (a1, b1), (a2, b2) = kronecker_splits(d_out, d_in, TERMS, strict=False)
    return TERMS * (a1 * a2 + b1 * RANK + RANK * b2)


def test_parameter_counts_kron_against_full(unet):
    kron = LocalControlAdapter.from_unet(unet, condition_channels=CHANNELS, adapter="kron", terms=TERMS, rank=RANK)
    full = LocalControlAdapter.from_unet(unet, condition_channels=CHANNELS, adapter="full")
    kc, fc = kron.parameter_counts(), full.parameter_counts()

    # The copy, computed from the backbone: its encoder half less the first resnet's two GroupNorms
    # per level (FDN replaces them), and the Kronecker factors of each of its linears / convs.
    copied = [unet.conv_in, unet.time_embedding, unet.down_blocks, unet.mid_block]
    copy_params = sum(p.numel() for m in copied for p in m.parameters())
    copy_params -= sum(p.numel() for b in unet.down_blocks for n in ("norm1", "norm2")
                       for p in getattr(b.resnets[0], n).parameters())
    factors = sum(kron_factor_count(m) for root in copied for m in root.modules()
                  if isinstance(m, (nn.Linear, nn.Conv2d)))

    assert fc["copy"] == kc["copy"] == copy_params
    assert kc["kronecker_factors"] == factors
    assert fc["trainable"] == fc["total"]
    assert fc["trainable"] - kc["trainable"] == copy_params - factors > 0
    assert kc["total"] == fc["total"] + factors
    shared = kc["fdn_convs"] + kc["feature_extractor"] + kc["zero_convs"]
    assert kc["trainable"] == factors + shared and fc["trainable"] == copy_params + shared


def test_fused_and_eager_fdn_agree(unet):
    # fp64, so that the comparison sees the FDN paths and not fp32 rounding through the blocks
    adapter = LocalControlAdapter.from_unet(unet, condition_channels=CHANNELS).double()
    perturb_zero_inits(adapter, 0.5)
    x = {k: v.double() if k != "condition" and v.is_floating_point() else v for k, v in inputs().items()}
    blocks = [m for m in adapter.modules() if isinstance(m, FDNResnetBlock)]
    assert len(blocks) == len(unet.down_blocks) and all(b.fused for b in blocks)
    with torch.no_grad():
        fused = adapter(**x)[1]
        for b in blocks:
            b.fused = False
        eager = adapter(**x)[1]
    assert fused.dtype == torch.float64 and fused.abs().max() > 0
    torch.testing.assert_close(fused, eager, rtol=1e-10, atol=1e-10 * fused.abs().max().item())


@pytest.mark.parametrize("mode", ["kron", "full"])
def test_save_load_round_trip(unet, tmp_path, mode):
    adapter = LocalControlAdapter.from_unet(unet, condition_channels=CHANNELS, adapter=mode, terms=TERMS, rank=RANK)
    perturb_zero_inits(adapter)
    x = inputs()
    with torch.no_grad():
        down, mid = adapter(**x)
    assert mid.abs().max() > 0
    adapter.save_pretrained(tmp_path)
    loaded = LocalControlAdapter.from_pretrained(tmp_path)
    assert loaded.config.adapter == mode and loaded.config.condition_channels == CHANNELS
    assert [n for n, _ in loaded.named_trainable_parameters()] == [n for n, _ in adapter.named_trainable_parameters()]
    assert all(p.requires_grad == expected_trainable(n, mode) for n, p in loaded.named_parameters())
    with torch.no_grad():
        down2, mid2 = loaded(**x)
    assert torch.equal(mid, mid2) and all(torch.equal(a, b) for a, b in zip(down, down2))


def test_merge_kron_for_inference(unet, tmp_path):
    adapter = LocalControlAdapter.from_unet(unet, condition_channels=CHANNELS)
    perturb_zero_inits(adapter, 0.2)
    x = inputs()
    with torch.no_grad():
        _, mid = adapter(**x)
        adapter.merge_kron()
        _, merged = adapter(**x)
        with pytest.raises(ValueError, match="unmerge_kron"):
            adapter.save_pretrained(tmp_path)
        adapter.unmerge_kron()
        _, unmerged = adapter(**x)
    torch.testing.assert_close(merged, mid, rtol=1e-4, atol=1e-5 * mid.abs().max().item())
    torch.testing.assert_close(unmerged, mid, rtol=1e-4, atol=1e-5 * mid.abs().max().item())


@pytest.mark.parametrize("mode", ["kron", "full"])
def test_decomposed_backbone(decomposed_unet, tmp_path, mode):
    unet = decomposed_unet
    lowrank = (elr_ext.nn.LowRankLinear, elr_ext.nn.LowRankConv2d)
    adapter = LocalControlAdapter.from_unet(unet, condition_channels=CHANNELS, adapter=mode, terms=TERMS, rank=RANK)
    x = inputs()
    down, mid = adapter(**x)
    assert all(torch.count_nonzero(r) == 0 for r in down) and torch.count_nonzero(mid) == 0
    if mode == "kron":  # low-rank layers became their two plain pieces, each adapted: no dense weight
        assert not any(isinstance(m, lowrank) for m in adapter.modules())
        to_q = adapter.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
        rank = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.rank
        assert to_q.down.base.weight.shape == (rank, 64) and to_q.up.base.weight.shape == (64, rank)
    else:
        assert any(isinstance(m, lowrank) for m in adapter.modules())
    dense_copy = sum(p.numel() for p in LocalControlAdapter.from_unet(tiny.tiny_unet(), condition_channels=CHANNELS,
                                                                      adapter=mode)._copy_parameters())
    assert adapter.parameter_counts()["copy"] < dense_copy

    perturb_zero_inits(adapter)
    backbone = {n: p.detach().clone() for n, p in unet.named_parameters()}
    before = {n: p.detach().clone() for n, p in adapter.named_parameters()}
    optimizer = torch.optim.SGD(adapter.trainable_parameters(), lr=0.1)
    down, mid = adapter(**x)
    pred = unet(x["sample"], x["timestep"], x["encoder_hidden_states"], down_block_additional_residuals=down,
                mid_block_additional_residual=mid).sample
    pred.square().mean().backward()
    optimizer.step()
    changed = {n for n, p in adapter.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, _ in adapter.named_trainable_parameters()}
    assert all(torch.equal(p, backbone[n]) for n, p in unet.named_parameters())

    with torch.no_grad():
        down, mid = adapter(**x)
    adapter.save_pretrained(tmp_path)
    loaded = LocalControlAdapter.from_pretrained(tmp_path)
    with torch.no_grad():
        down2, mid2 = loaded(**x)
    assert torch.equal(mid, mid2) and all(torch.equal(a, b) for a, b in zip(down, down2))


def test_two_conditions_given_as_maps_or_concatenated(unet):
    adapter = LocalControlAdapter.from_unet(unet, condition_channels=CHANNELS)
    perturb_zero_inits(adapter)
    x = inputs()
    with torch.no_grad():
        _, as_list = adapter(**x)
        _, as_tensor = adapter(**{**x, "condition": torch.cat(x["condition"], dim=1)})
        _, other = adapter(**{**x, "condition": [1 - c for c in x["condition"]]})
        _, scaled = adapter(**x, conditioning_scale=0.5)
    assert torch.equal(as_list, as_tensor)
    assert not torch.allclose(as_list, other)  # the control reaches the residuals
    torch.testing.assert_close(scaled, 0.5 * as_list)


def test_condition_is_resized_to_the_image_size(unet):
    adapter = LocalControlAdapter.from_unet(unet, condition_channels=3)
    perturb_zero_inits(adapter)
    x = inputs()
    small = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        _, mid = adapter(x["sample"], x["timestep"], x["encoder_hidden_states"], small)
        up = torch.nn.functional.interpolate(small, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
        _, mid_up = adapter(x["sample"], x["timestep"], x["encoder_hidden_states"], up)
    assert torch.equal(mid, mid_up)
    # other latent sizes divisible by the total downsampling (4) work too
    down, mid = adapter(torch.randn(1, 3, 24, 40), 5, torch.randn(1, 8, 32), torch.rand(1, 3, 24, 40))
    assert down[0].shape == (1, 32, 24, 40) and mid.shape == (1, 64, 6, 10)


def test_latent_factor_sets_the_condition_resolution(unet):
    latent_unet = tiny.tiny_unet(in_channels=4, out_channels=4, sample_size=16)
    adapter = LocalControlAdapter.from_unet(latent_unet, condition_channels=1, latent_factor=8)
    strided = [m for m in adapter.feature_extractor.modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
    assert len(strided) == 3 + 2  # 3 halvings image -> latent, then 2 more for levels 2 and 3
    features = adapter.feature_extractor(torch.rand(1, 1, 128, 128))
    assert [tuple(f.shape[-2:]) for f in features] == [(16, 16), (8, 8), (4, 4)]
    down, mid = adapter(torch.randn(1, 4, 16, 16), 3, torch.randn(1, 8, 32), torch.rand(1, 1, 128, 128))
    assert len(down) == 6 and torch.count_nonzero(mid) == 0


def test_clear_errors(unet):
    adapter = LocalControlAdapter.from_unet(unet, condition_channels=CHANNELS)
    x = inputs()
    with pytest.raises(ValueError, match=r"condition has 3 channels; the adapter expects 4"):
        adapter(x["sample"], 1, x["encoder_hidden_states"], torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"condition\[1\] has 1 channels; the adapter expects 3"):
        adapter(x["sample"], 1, x["encoder_hidden_states"], [torch.rand(2, 1, 32, 32)] * 2)
    with pytest.raises(ValueError, match="latent size 30x30 is not divisible by the UNet's total downsampling 4"):
        adapter(torch.randn(2, 3, 30, 30), 1, x["encoder_hidden_states"], torch.rand(2, 4, 30, 30))
    with pytest.raises(ValueError, match="sample has 4 channels; the UNet takes 3"):
        adapter(torch.randn(2, 4, 32, 32), 1, x["encoder_hidden_states"], x["condition"])
    with pytest.raises(ValueError, match="adapter='lora'"):
        LocalControlAdapter.from_unet(unet, condition_channels=1, adapter="lora")
    with pytest.raises(ValueError, match="latent_factor must be a power of 2"):
        LocalControlAdapter.from_unet(unet, condition_channels=1, latent_factor=6)


@pytest.mark.parametrize("mode", ["kron", "full"])
def test_gradient_checkpointing_saves_less_and_gives_the_same_gradients(mode):
    """Per copied block, the features passed in again: the same gradients, and autograd keeps only
    the blocks' inputs (the deterministic part of the memory saving: bytes of the saved tensors)."""
    torch.manual_seed(0)
    source = tiny.tiny_unet().requires_grad_(False)
    source.enable_gradient_checkpointing()  # the copies must not inherit diffusers' per-block checkpointing
    adapter = LocalControlAdapter.from_unet(source, condition_channels=[1, 3], adapter=mode)
    assert not adapter.is_gradient_checkpointing
    perturb_zero_inits(adapter)
    args = inputs()

    def run():
        adapter.zero_grad()
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            down, mid = adapter(**args)
        (sum(r.pow(2).sum() for r in down) + mid.pow(2).sum()).backward()
        grads = {n: p.grad.clone() for n, p in adapter.named_parameters() if p.grad is not None}
        return grads, sum(saved)

    plain, plain_bytes = run()
    adapter.enable_gradient_checkpointing()
    assert adapter.is_gradient_checkpointing
    checkpointed, checkpointed_bytes = run()
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)
    assert checkpointed_bytes < 0.5 * plain_bytes, (checkpointed_bytes, plain_bytes)
    adapter.disable_gradient_checkpointing()
    assert not adapter.is_gradient_checkpointing
    with pytest.raises(ValueError, match="gradient_checkpointing_func"):
        adapter.enable_gradient_checkpointing(gradient_checkpointing_func=torch.utils.checkpoint.checkpoint)
