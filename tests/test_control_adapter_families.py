"""LocalControlAdapter on the SD 1.5- and SDXL-shaped tiny UNets (elr_ext.tiny.TINY_VARIANTS): zero
residuals at init with a bit-identical UNet output, SDXL's added embedding copied and adapted like
the rest, one step training exactly the trainable parameters, save/load, a decomposed backbone, and
the errors for missing or malformed added_cond_kwargs and unsupported UNet features."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

import elr_ext  # noqa: E402
from elr_ext import tiny  # noqa: E402
from elr_ext.nn.control_adapter import LocalControlAdapter  # noqa: E402
from elr_ext.nn.kron_lora import KronLoRALinear  # noqa: E402
from helpers import perturb_zero_inits  # noqa: E402

VARIANTS = ["tiny-sd15", "tiny-sdxl"]
CHANNELS = [1, 3]
LATENT_FACTOR = 2  # tiny_vae's


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request):
    torch.manual_seed(0)
    return request.param, tiny.tiny_variant_unet(request.param).requires_grad_(False)


def inputs(unet, batch=2, latent=16):
    cfg = unet.config
    size = latent * LATENT_FACTOR
    x = dict(sample=torch.randn(batch, cfg.in_channels, latent, latent), timestep=torch.randint(0, 1000, (batch,)),
             encoder_hidden_states=torch.randn(batch, 8, cfg.cross_attention_dim),
             condition=[(torch.rand(batch, 1, size, size) > 0.8).float(), torch.rand(batch, 3, size, size)])
    added = None
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = {"text_embeds": torch.randn(batch, pooled),
                 "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch, dtype=torch.float32)}
    return x, added


def unet_out(unet, x, added, down=None, mid=None):
    with torch.no_grad():
        return unet(x["sample"], x["timestep"], x["encoder_hidden_states"], added_cond_kwargs=added,
                    down_block_additional_residuals=down, mid_block_additional_residual=mid).sample


@pytest.mark.parametrize("mode", ["kron", "full"])
def test_zero_residuals_at_init_leave_the_output_bit_identical(variant, mode):
    name, unet = variant
    adapter = LocalControlAdapter.from_unet(unet, condition_channels=CHANNELS, adapter=mode,
                                            latent_factor=LATENT_FACTOR)
    x, added = inputs(unet)
    down, mid = adapter(**x, added_cond_kwargs=added)
    assert len(down) == 1 + sum(len(b.resnets) + len(b.downsamplers or []) for b in unet.down_blocks)
    assert all(torch.count_nonzero(r) == 0 for r in down) and torch.count_nonzero(mid) == 0
    assert torch.equal(unet_out(unet, x, added, down, mid), unet_out(unet, x, added))


def test_sdxl_added_embedding_is_copied_and_matches_the_unet():
    torch.manual_seed(0)
    unet = tiny.tiny_variant_unet("tiny-sdxl").requires_grad_(False)
    x, added = inputs(unet)
    # The UNet's own time embedding with the added (text_time) part, as its forward computes it.
    t_emb = unet.get_time_embed(sample=x["sample"], timestep=x["timestep"])
    emb = unet.time_embedding(t_emb)
    expected = emb + unet.get_aug_embed(emb=emb, encoder_hidden_states=x["encoder_hidden_states"],
                                        added_cond_kwargs=added)
    for mode in ("full", "kron"):  # kron: every Kronecker update is zero at init
        adapter = LocalControlAdapter.from_unet(unet, condition_channels=CHANNELS, adapter=mode,
                                                latent_factor=LATENT_FACTOR)
        got = adapter._time_embedding(x["timestep"], x["sample"], added)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # in kron mode the added embedding's linears carry Kronecker updates, as every linear of the copy
    assert isinstance(adapter.add_embedding.linear_1, KronLoRALinear)
    assert isinstance(adapter.add_embedding.linear_2, KronLoRALinear)
    trainable = [n for n, _ in adapter.named_trainable_parameters()]
    assert any(n.startswith("add_embedding.linear_1.") for n in trainable)


@pytest.mark.parametrize("mode", ["kron", "full"])
def test_one_step_trains_exactly_the_trainable_parameters(variant, mode):
    name, unet = variant
    adapter = LocalControlAdapter.from_unet(unet, condition_channels=CHANNELS, adapter=mode,
                                            latent_factor=LATENT_FACTOR)
    perturb_zero_inits(adapter)  # so that every trainable tensor gets a gradient
    before = {n: p.detach().clone() for n, p in adapter.named_parameters()}
    x, added = inputs(unet)
    down, mid = adapter(**x, added_cond_kwargs=added)
    pred = unet(x["sample"], x["timestep"], x["encoder_hidden_states"], added_cond_kwargs=added,
                down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    pred.square().mean().backward()
    torch.optim.SGD(adapter.trainable_parameters(), lr=0.1).step()
    changed = {n for n, p in adapter.named_parameters() if not torch.equal(p, before[n])}
    names = {n for n, _ in adapter.named_trainable_parameters()}
    assert changed == names, (sorted(changed - names)[:5], sorted(names - changed)[:5])
    assert all(p.grad is None for p in unet.parameters())


def test_save_load_round_trip_sdxl(tmp_path):
    torch.manual_seed(0)
    unet = tiny.tiny_variant_unet("tiny-sdxl").requires_grad_(False)
    adapter = LocalControlAdapter.from_unet(unet, condition_channels=CHANNELS, latent_factor=LATENT_FACTOR)
    with torch.no_grad():
        for _, p in adapter.named_trainable_parameters():
            p.add_(torch.randn_like(p) * 0.01)
    adapter.save_pretrained(tmp_path / "adapter")
    loaded = LocalControlAdapter.from_pretrained(tmp_path / "adapter")
    x, added = inputs(unet)
    for a, b in zip(*(m(**x, added_cond_kwargs=added) for m in (adapter, loaded))):
        for r, s in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            assert torch.equal(r, s)
    assert [n for n, _ in loaded.named_trainable_parameters()] == [n for n, _ in adapter.named_trainable_parameters()]


def test_decomposed_sdxl_backbone():
    torch.manual_seed(0)
    unet = tiny.tiny_variant_unet("tiny-sdxl").requires_grad_(False)
    elr_ext.decompose(unet, rank_ratio=1 / 2)
    adapter = LocalControlAdapter.from_unet(unet, condition_channels=CHANNELS, latent_factor=LATENT_FACTOR)
    x, added = inputs(unet)
    down, mid = adapter(**x, added_cond_kwargs=added)
    assert torch.equal(unet_out(unet, x, added, down, mid), unet_out(unet, x, added))


def test_clear_errors_for_added_conditioning():
    torch.manual_seed(0)
    xl = tiny.tiny_variant_unet("tiny-sdxl").requires_grad_(False)
    adapter = LocalControlAdapter.from_unet(xl, condition_channels=CHANNELS, latent_factor=LATENT_FACTOR)
    x, added = inputs(xl)
    with pytest.raises(ValueError, match="added_cond_kwargs needs 'text_embeds' and 'time_ids'"):
        adapter(**x)
    with pytest.raises(ValueError, match="added_cond_kwargs needs 'time_ids'"):
        adapter(**x, added_cond_kwargs={"text_embeds": added["text_embeds"]})
    with pytest.raises(ValueError, match=r"added_cond_kwargs\['time_ids'\] has batch 1; the sample has 2"):
        adapter(**x, added_cond_kwargs={**added, "time_ids": added["time_ids"][:1]})
    with pytest.raises(ValueError, match="give 72 features; the UNet's add_embedding takes 80"):
        adapter(**x, added_cond_kwargs={**added, "text_embeds": added["text_embeds"][:, :24]})

    sd15 = tiny.tiny_variant_unet("tiny-sd15").requires_grad_(False)
    plain = LocalControlAdapter.from_unet(sd15, condition_channels=CHANNELS, latent_factor=LATENT_FACTOR)
    x, _ = inputs(sd15)
    with pytest.raises(ValueError, match="added_cond_kwargs was given but the UNet has no addition_embed_type"):
        plain(**x, added_cond_kwargs=added)

    other = tiny.tiny_variant_unet("tiny-sd15", addition_embed_type="text", encoder_hid_dim=None)
    with pytest.raises(ValueError, match=r"addition_embed_type='text' \(only 'text_time', SDXL's, is supported\)"):
        LocalControlAdapter.from_unet(other, condition_channels=1)
