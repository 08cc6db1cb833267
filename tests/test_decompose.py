"""Stage I's low-rank student (paper 2.2.1): LowRankLinear / LowRankConv2d against the dense layers
they replace (fp64 reference, the tolerance rule), the truncated SVD, gradients, elr_ext.decompose on
a tiny diffusers UNet (full rank end to end, exact parameter counts, every rank policy, include /
exclude), LowRankAttnProcessor against diffusers' AttnProcessor2_0 on the same low-rank weights,
save/load, bad input; and the same for the family-shaped tiny UNets of elr_ext.tiny (SD 1.5's conv
projections and single head size, SDXL's multi-layer transformer blocks, linear projections and
text_time added embedding)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import elr_ext
from elr_ext.decompose import DEFAULT_RANK_RATIO, DecomposeReport
from elr_ext.nn import LowRankAttnProcessor, LowRankConv2d, LowRankLinear
from helpers import assert_close_to_ref

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import Attention, AttnProcessor2_0  # noqa: E402

TINY_UNET = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
                 sample_size=16, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tiny_unet() -> UNet2DConditionModel:
    unet = UNet2DConditionModel(**TINY_UNET).eval()
    with torch.no_grad():  # diffusers zero-initialises no layer here, but make every bias count
        for p in unet.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.1)
    return unet


def unet_inputs(batch=2):
    return torch.randn(batch, 4, 16, 16), torch.randint(0, 1000, (batch,)), torch.randn(batch, 7, 32)


def run(unet, inputs):
    with torch.no_grad():
        return unet(*inputs).sample


def low_rank_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (LowRankLinear, LowRankConv2d))}


# ---------------------------------------------------------------------------------------- modules
@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (17, 17)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("split", ["us", "balanced"])
def test_linear_at_full_rank_reproduces_the_layer(shape, bias, split):
    out_f, in_f = shape
    dense = nn.Linear(in_f, out_f, bias=bias)
    low = LowRankLinear.from_linear(dense, min(shape), split=split)
    x = torch.randn(3, 5, in_f)
    ref64 = nn.functional.linear(x.double(), dense.weight.double(), None if bias is False else dense.bias.double())
    with torch.no_grad():
        assert_close_to_ref(low(x), ref64, dense(x), "LowRankLinear")
    assert (low.down.shape, low.up.shape) == ((min(shape), in_f), (out_f, min(shape)))


@pytest.mark.parametrize("split", ["us", "balanced"])
def test_truncated_factors_are_the_papers_svd_split(split):
    dense = nn.Linear(30, 20).double()
    k = 6
    low = LowRankLinear.from_linear(dense, k, split=split)
    U, S, Vh = torch.linalg.svd(dense.weight.detach())
    best = U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]  # Eckart-Young: the best rank-k approximation
    torch.testing.assert_close(low.up @ low.down, best, rtol=0, atol=1e-12)
    if split == "us":  # A = U_k S_k, B = V_k^T: the rows of B are orthonormal
        torch.testing.assert_close(low.down @ low.down.T, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-12)
    else:  # sqrt(S) on both sides: A^T A = B B^T = S_k
        torch.testing.assert_close(low.up.T @ low.up, low.down @ low.down.T, rtol=0, atol=1e-12)
    x = torch.randn(4, 30, dtype=torch.float64)
    torch.testing.assert_close(low(x), x @ best.T + dense.bias, rtol=0, atol=1e-12)


CONVS = [  # (in, out, kernel, stride, padding, dilation, bias, padding_mode)
    (5, 7, 3, 1, 1, 1, True, "zeros"),
    (6, 4, 3, 2, 1, 1, True, "zeros"),
    (4, 9, (3, 1), (2, 1), (0, 2), 1, False, "zeros"),
    (3, 6, 3, 1, 2, 2, True, "zeros"),
    (8, 8, 1, 1, 0, 1, True, "zeros"),
    (4, 5, 3, 1, 1, 1, True, "reflect"),
    (3, 40, 3, 1, "same", 1, True, "zeros"),  # out > in * kh * kw: full rank is 27
]


@pytest.mark.parametrize("spec", CONVS)
@pytest.mark.parametrize("split", ["us", "balanced"])
def test_conv_at_full_rank_reproduces_the_layer(spec, split):
    cin, cout, kernel, stride, padding, dilation, bias, padding_mode = spec
    dense = nn.Conv2d(cin, cout, kernel, stride, padding, dilation, bias=bias, padding_mode=padding_mode)
    full = min(cout, dense.weight[0].numel())
    low = LowRankConv2d.from_conv(dense, full, split=split)
    x = torch.randn(2, cin, 11, 9)
    with torch.no_grad():
        ref64 = copy.deepcopy(dense).double()(x.double())
        assert_close_to_ref(low(x), ref64, dense(x), "LowRankConv2d")
    assert low.down.shape == (full, cin, *dense.kernel_size) and low.up.shape == (cout, full, 1, 1)


def test_low_rank_conv_is_the_truncated_product():
    dense = nn.Conv2d(6, 10, 3, stride=2, padding=1).double()
    low = LowRankConv2d.from_conv(dense, 4)
    U, S, Vh = torch.linalg.svd(dense.weight.detach().flatten(1))
    best = (U[:, :4] * S[:4] @ Vh[:4]).view_as(dense.weight)
    x = torch.randn(2, 6, 9, 8, dtype=torch.float64)
    torch.testing.assert_close(low(x), nn.functional.conv2d(x, best, dense.bias, 2, 1), rtol=0, atol=1e-11)


def test_gradients_flow_to_the_factors():
    lin = LowRankLinear.from_linear(nn.Linear(12, 10), 5)
    conv = LowRankConv2d.from_conv(nn.Conv2d(3, 8, 3, padding=1), 4)
    for module, x in ((lin, torch.randn(4, 7, 12)), (conv, torch.randn(2, 3, 6, 6))):
        grad = torch.randn_like(module(x))
        module(x).backward(grad)
        # the same gradients through plain autograd of the explicit two-step product
        params = {n: p.detach().clone().requires_grad_() for n, p in module.named_parameters()}
        if module is lin:
            y = (x @ params["down"].T) @ params["up"].T + params["bias"]
        else:
            h = nn.functional.conv2d(x, params["down"], None, 1, 1)
            y = nn.functional.conv2d(h, params["up"], params["bias"])
        y.backward(grad)
        for name, p in module.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-5, atol=1e-5)


def test_repr_shows_the_rank():
    assert "rank=3" in repr(LowRankLinear.from_linear(nn.Linear(8, 6), 3))
    assert "rank=2" in repr(LowRankConv2d.from_conv(nn.Conv2d(4, 6, 3), 2))


def test_module_bad_input():
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear.from_linear(nn.Linear(8, 6), 7)  # above min(out, in)
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear.from_linear(nn.Linear(8, 6), 0)
    with pytest.raises(ValueError, match="split"):
        LowRankLinear.from_linear(nn.Linear(8, 6), 2, split="sv")
    with pytest.raises(ValueError, match="groups"):
        LowRankConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2), 2)
    with pytest.raises(TypeError, match="linear"):
        LowRankLinear.from_linear(nn.Conv2d(4, 4, 3), 2)


# ------------------------------------------------------------------------------ decompose: UNet
def test_full_rank_unet_reproduces_the_dense_unet():
    dense = tiny_unet()
    ref64_model = copy.deepcopy(dense)
    for p in ref64_model.parameters():  # (not .double(): diffusers warns about casting a model)
        p.data = p.data.double()
    inputs = unet_inputs()
    expected32 = run(dense, inputs)
    ref64 = run(ref64_model, [t.double() if t.is_floating_point() else t for t in inputs])
    report = elr_ext.decompose(dense, rank_ratio=1.0, min_saving=None)
    assert not report.kept_dense and len(report.decomposed) == len(low_rank_layers(dense))
    assert max(layer.rel_error for layer in report.layers) < 1e-6
    assert_close_to_ref(run(dense, inputs), ref64, expected32, "full-rank UNet")


def test_lower_rank_gives_the_reported_parameter_count_and_gradients_flow():
    unet = tiny_unet()
    before = count(unet)
    report = elr_ext.decompose(unet, rank_ratio=0.25)
    assert report.params_before == before
    assert report.params_after == count(unet) < before
    per_layer = sum(l.params_before - l.params_after for l in report.layers)
    assert report.params_before - per_layer == report.params_after
    modules = low_rank_layers(unet)
    assert set(modules) == {l.name for l in report.decomposed}
    for layer in report.decomposed:
        assert modules[layer.name].rank == layer.rank == max(1, math.floor(0.25 * layer.full_rank + 0.5))
        assert layer.params_after == sum(p.numel() for p in modules[layer.name].parameters())
        assert 0 < layer.rel_error < 1
    for layer in report.kept_dense:
        assert layer.reason and layer.params_before == layer.params_after
    assert unet._elr_decompose_config["layers"] == {l.name: {"kind": l.kind, "rank": l.rank} for l in report.decomposed}
    text = str(report)
    assert "conv_in" in text and f"{report.params_after:,}" in text
    assert report.to_dict()["params_after"] == report.params_after

    unet.train()
    unet(*unet_inputs()).sample.square().mean().backward()
    for name, module in modules.items():
        assert module.down.grad is not None and module.down.grad.abs().sum() > 0, name
        assert module.up.grad is not None and module.up.grad.abs().sum() > 0, name


def test_attention_processor_is_installed_and_matches_diffusers():
    unet = tiny_unet()
    report = elr_ext.decompose(unet, rank_ratio=0.25)
    attentions = {n: m for n, m in unet.named_modules() if isinstance(m, Attention)}
    assert set(report.attention_processors) == set(attentions) and len(attentions) == 8  # attn1 + attn2 in 4 blocks
    assert all(isinstance(m.processor, LowRankAttnProcessor) for m in attentions.values())
    default = copy.deepcopy(unet)
    default.set_attn_processor(AttnProcessor2_0())
    inputs = unet_inputs()
    ours, theirs = run(unet, inputs), run(default, inputs)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())


def test_processor_fuses_qkv_into_one_call_per_input(monkeypatch):
    import elr_ext.nn.attention as attention_module

    calls = []

    def spy(x, downs, ups, biases=None):
        calls.append((tuple(x.shape), len(downs)))
        return elr_ext.lowrank_proj(x, downs, ups, biases)

    monkeypatch.setattr(attention_module, "lowrank_proj", spy)
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8)
    elr_ext.decompose(attn, rank_ratio=0.5, min_saving=None, exclude="to_out.*")
    hidden, context = torch.randn(2, 5, 16), torch.randn(2, 3, 8)
    attn(hidden, encoder_hidden_states=context)
    assert calls == [((2, 5, 16), 1), ((2, 3, 8), 2)]  # q on the hidden states; k, v on the context
    calls.clear()
    self_attn = Attention(query_dim=16, heads=2, dim_head=8)
    elr_ext.decompose(self_attn, rank_ratio=0.5, min_saving=None, exclude="to_out.*")
    self_attn(hidden)
    assert calls == [((2, 5, 16), 3)]


ATTENTIONS = {  # what AttnProcessor2_0 handles beyond the UNet's plain self- and cross-attention
    "4d_groupnorm_residual_rescale": dict(kw=dict(query_dim=32, heads=4, dim_head=8, norm_num_groups=8,
                                                  residual_connection=True, rescale_output_factor=2.0, bias=True),
                                          four_d=True, context=False),
    "cross_norm_cross_mask": dict(kw=dict(query_dim=24, cross_attention_dim=16, heads=3, dim_head=8,
                                          cross_attention_norm="layer_norm", out_bias=True),
                                  four_d=False, context=True),
    "spatial_norm": dict(kw=dict(query_dim=32, heads=2, dim_head=16, spatial_norm_dim=4), four_d=True, context=False),
    "qk_norm": dict(kw=dict(query_dim=16, heads=2, dim_head=8, qk_norm="layer_norm"), four_d=False, context=False),
}


@pytest.mark.parametrize("case", sorted(ATTENTIONS))
@pytest.mark.parametrize("mixed", [False, True])
def test_processor_matches_attnprocessor2_0_on_the_same_weights(case, mixed):
    spec = ATTENTIONS[case]
    attn = Attention(**spec["kw"]).eval()
    # mixed: q and v low rank, k kept dense (the processor fuses the low-rank ones, calls the rest)
    report = elr_ext.decompose(attn, rank_ratio=0.5, min_saving=None, exclude="to_k" if mixed else None)
    assert report.attention_processors == [""] and isinstance(attn.processor, LowRankAttnProcessor)
    assert isinstance(attn.to_k, nn.Linear if mixed else LowRankLinear) and isinstance(attn.to_q, LowRankLinear)
    q = spec["kw"]["query_dim"]
    hidden = torch.randn(2, q, 4, 5) if spec["four_d"] else torch.randn(2, 9, q)
    kwargs = {}
    if spec["context"]:
        kwargs["encoder_hidden_states"] = torch.randn(2, 6, spec["kw"]["cross_attention_dim"])
        mask = torch.zeros(2, 1, 6)
        mask[0, 0, 4:] = -1e4  # the first sample may not look at its last two tokens
        kwargs["attention_mask"] = mask
    if "spatial_norm_dim" in spec["kw"]:
        kwargs["temb"] = torch.randn(2, 4, 2, 3)
    with torch.no_grad():
        ours = attn(hidden, **kwargs)
        attn.set_processor(AttnProcessor2_0())
        theirs = attn(hidden, **kwargs)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------- policies
def test_default_policy_is_a_third_of_full_rank():
    unet = tiny_unet()
    report = elr_ext.decompose(unet)
    assert report.policy["rank_ratio"] == DEFAULT_RANK_RATIO == 1 / 3
    assert all(l.rank == max(1, math.floor(l.full_rank / 3 + 0.5)) for l in report.decomposed)


def test_fixed_rank_is_clipped_and_kept_dense_where_it_saves_nothing():
    unet = tiny_unet()
    report = elr_ext.decompose(unet, rank=20)
    by_name = {l.name: l for l in report.layers}
    conv_out = by_name["conv_out"]  # [4, 32, 3, 3]: clipped to rank 4, which costs more than dense
    assert conv_out.rank is None and "rank 4 would not save" in conv_out.reason
    for l in report.decomposed:
        assert l.rank == 20 and 20 * (l.shape[0] + math.prod(l.shape[1:])) < math.prod(l.shape)
    for l in report.kept_dense:
        k = min(20, l.full_rank)
        assert k * (l.shape[0] + math.prod(l.shape[1:])) >= math.prod(l.shape)
    assert report.params_after == count(unet)


def test_energy_policy_picks_the_smallest_rank_reaching_the_share():
    unet = tiny_unet()
    spectra = {n: torch.linalg.svdvals(m.weight.detach().double().flatten(1)) for n, m in unet.named_modules()
               if type(m) in (nn.Linear, nn.Conv2d)}
    report = elr_ext.decompose(unet, energy=0.6)
    assert report.decomposed
    for l in report.decomposed:
        share = spectra[l.name].square().cumsum(0) / spectra[l.name].square().sum()
        assert share[l.rank - 1] >= 0.6 - 1e-12 and (l.rank == 1 or share[l.rank - 2] < 0.6)
        # the relative error of the truncation is the square root of the energy left out
        assert abs(l.rel_error - math.sqrt(max(1 - share[l.rank - 1].item(), 0))) < 1e-5


def test_param_budget_fits_the_total():
    dense_total = count(tiny_unet())
    budget = int(0.5 * dense_total)
    unet = tiny_unet()
    report = elr_ext.decompose(unet, param_budget=budget)
    assert report.params_after == count(unet) <= budget
    # the greedy stops only when no layer's next step fits: the slack is below every pending step
    # (rank k -> k + 1 costs out + in; at the largest rank that saves, the step is back to dense)
    def next_step(l):
        out, inp = l.shape[0], math.prod(l.shape[1:])
        k_save = (out * inp - 1) // (out + inp)
        return out + inp if l.rank < k_save else out * inp - l.rank * (out + inp)
    assert budget - report.params_after < min(next_step(l) for l in report.decomposed)
    tighter = tiny_unet()
    assert elr_ext.decompose(tighter, param_budget=int(0.3 * dense_total)).params_after <= int(0.3 * dense_total)
    roomy = tiny_unet()
    assert not elr_ext.decompose(roomy, param_budget=dense_total).decomposed  # the dense model fits
    with pytest.raises(ValueError, match="param_budget"):
        elr_ext.decompose(tiny_unet(), param_budget=1000)


def test_include_exclude_and_grouped_convs():
    unet = tiny_unet()
    report = elr_ext.decompose(unet, rank_ratio=0.5, include="*transformer_blocks*", exclude=["*.attn2.*"])
    names = {l.name for l in report.decomposed}
    assert names and all("transformer_blocks" in n and ".attn2." not in n for n in names)
    assert {l.reason for l in report.kept_dense} >= {"not matched by include", "matched by exclude"}
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 16, 3))
    report = elr_ext.decompose(model, rank=2)
    assert report.layers[0].reason == "grouped conv (groups=2)" and report.layers[1].rank == 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=4, energy=0.9), "conflicting"),
    (dict(rank_ratio=0.5, param_budget=10**5), "conflicting"),
    (dict(split="svd"), "split"),
    (dict(rank=0), "rank"),
    (dict(rank=2.5), "rank"),
    (dict(rank_ratio=0.0), "rank_ratio"),
    (dict(rank_ratio=1.5), "rank_ratio"),
    (dict(energy=0.0), "energy"),
    (dict(energy=1.01), "energy"),
    (dict(param_budget=-5), "param_budget"),
    (dict(min_saving=1.0), "min_saving"),
    (dict(include="nothing_like_this*"), "include"),
    (dict(exclude=["conv_in", "no.such.layer"]), "exclude"),
])
def test_decompose_bad_input(kwargs, match):
    unet = tiny_unet()
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        elr_ext.decompose(unet, **kwargs)
    assert not low_rank_layers(unet) and all(torch.equal(v, unet.state_dict()[k]) for k, v in state.items())
    with pytest.raises(TypeError):
        elr_ext.decompose(unet, svd_rank=3)  # an unknown policy


# ---------------------------------------------------------------------------------- save / load
def test_save_and_load_round_trip(tmp_path):
    unet = tiny_unet()
    report = elr_ext.decompose(unet, rank_ratio=0.25, split="balanced")
    with torch.no_grad():  # move off the SVD initialisation, as training would
        for p in unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    elr_ext.save_decomposed(unet, str(tmp_path))
    inputs = unet_inputs()
    expected = run(unet, inputs)
    for source in (UNet2DConditionModel(**TINY_UNET), None):  # a fresh dense model, or the stored config
        loaded = elr_ext.load_decomposed(source, str(tmp_path)).eval()
        assert count(loaded) == report.params_after
        assert all(isinstance(m.processor, LowRankAttnProcessor)
                   for m in loaded.modules() if isinstance(m, Attention))
        assert torch.equal(run(loaded, inputs), expected)
    with pytest.raises(ValueError, match="decompos"):
        elr_ext.save_decomposed(tiny_unet(), str(tmp_path / "dense"))


def test_report_type():
    report = elr_ext.decompose(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2)), rank=8)
    assert isinstance(report, DecomposeReport)
    assert [l.rank for l in report.layers] == [8, None]  # [2, 64] at rank 2 would not save
    assert report.params_after == 64 * 8 * 2 + 64 + 64 * 2 + 2


# ------------------------------------------------------------- family-shaped UNets: SD 1.5, SDXL
# elr_ext.tiny's variants keep each family's layout at tiny size: tiny-sd15 has 1x1 conv proj_in /
# proj_out and one attention_head_dim for every level; tiny-sdxl has no attention in its first level,
# transformer blocks of 1 and 2 layers (the mid block and up_blocks.0 take the last entry, 2), linear
# projections, 64-d context and the text_time added embedding (add_embedding.linear_1/2).
from elr_ext.tiny import tiny_variant_unet  # noqa: E402

VARIANTS = ("tiny-sdxl", "tiny-sd15")
# Attention modules (attn1 + attn2 per transformer layer): tiny-sdxl has 11 transformer layers
# (down_blocks.1: 1, down_blocks.2: 2, mid: 2, up_blocks.0: 2 attentions x 2, up_blocks.1: 2 x 1),
# tiny-sd15 has 7 (down_blocks.0 and .1: 1 each, mid: 1, up_blocks.1 and .2: 2 each).
VARIANT_ATTENTIONS = {"tiny-sdxl": 22, "tiny-sd15": 14}


def variant_unet(name: str) -> UNet2DConditionModel:
    unet = tiny_variant_unet(name).eval()
    with torch.no_grad():
        for p in unet.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.1)
    return unet


def variant_inputs(unet, batch=2):
    """(sample, timestep, context) and, for a text_time UNet, added_cond_kwargs: the pooled text
    embedding and the six micro-conditioning ids (original size, crop corner, target size)."""
    cfg = unet.config
    args = (torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size),
            torch.randint(0, 1000, (batch,)), torch.randn(batch, 7, cfg.cross_attention_dim))
    kwargs = {}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        time_ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]).repeat(batch, 1)
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled), "time_ids": time_ids}
    return args, kwargs


def run_variant(unet, inputs, dtype=None):
    args, kwargs = inputs
    if dtype is not None:
        args = [a.to(dtype) if a.is_floating_point() else a for a in args]
        kwargs = {k: {n: t.to(dtype) for n, t in v.items()} for k, v in kwargs.items()}
    with torch.no_grad():
        return unet(*args, **kwargs).sample


def dense_layers(model):
    return {n: m for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d) and n}


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_full_rank_reproduces_the_dense_unet(name):
    dense = variant_unet(name)
    ref64_model = copy.deepcopy(dense)
    for p in ref64_model.parameters():
        p.data = p.data.double()
    inputs = variant_inputs(dense)
    expected32, ref64 = run_variant(dense, inputs), run_variant(ref64_model, inputs, torch.float64)
    layers = dense_layers(dense)
    report = elr_ext.decompose(dense, rank_ratio=1.0, min_saving=None)
    assert not report.kept_dense and set(low_rank_layers(dense)) == set(layers) == {l.name for l in report.layers}
    assert max(layer.rel_error for layer in report.layers) < 1e-6
    assert_close_to_ref(run_variant(dense, inputs), ref64, expected32, f"full-rank {name} UNet")
    # the time embedding (and SDXL's added text_time embedding) are decomposed like any other linear
    embeddings = ["time_embedding.linear_1", "time_embedding.linear_2"]
    if name == "tiny-sdxl":
        embeddings += ["add_embedding.linear_1", "add_embedding.linear_2"]
    assert all(isinstance(dense.get_submodule(n), LowRankLinear) for n in embeddings)
    proj = dense.get_submodule("down_blocks.1.attentions.0.proj_in")
    assert isinstance(proj, LowRankConv2d if name == "tiny-sd15" else LowRankLinear)


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_attention_processors_on_every_layer_match_diffusers(name):
    unet = variant_unet(name)
    report = elr_ext.decompose(unet)
    attentions = {n: m for n, m in unet.named_modules() if isinstance(m, Attention)}
    assert len(attentions) == VARIANT_ATTENTIONS[name] and not report.attention_skipped
    assert sorted(report.attention_processors) == sorted(attentions)
    assert all(isinstance(m.processor, LowRankAttnProcessor) for m in attentions.values())
    assert all(isinstance(getattr(m, p), LowRankLinear)
               for m in attentions.values() for p in ("to_q", "to_k", "to_v"))
    if name == "tiny-sdxl":  # the second layer of the 2-layer blocks, self- and cross-attention
        for block in ("down_blocks.2.attentions.0", "mid_block.attentions.0", "up_blocks.0.attentions.1"):
            layer = f"{block}.transformer_blocks.1"
            assert {f"{layer}.attn1", f"{layer}.attn2"} <= set(attentions)
        assert attentions["mid_block.attentions.0.transformer_blocks.1.attn2"].to_k.in_features == 64
    default = copy.deepcopy(unet)
    default.set_attn_processor(AttnProcessor2_0())
    inputs = variant_inputs(unet)
    ours, theirs = run_variant(unet, inputs), run_variant(default, inputs)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_parameter_counts_follow_from_the_shapes(name):
    unet = variant_unet(name)
    before = count(unet)
    shapes = {n: (tuple(m.weight.shape), m.bias is not None) for n, m in dense_layers(unet).items()}
    report = elr_ext.decompose(unet)
    assert report.params_before == before and report.params_after == count(unet) < before
    expected = before
    for layer in report.layers:
        shape, bias = shapes[layer.name]
        assert layer.shape == shape
        out, inp = shape[0], math.prod(shape[1:])
        dense_params = out * inp + (out if bias else 0)
        assert layer.params_before == dense_params
        if layer.rank is None:
            assert layer.params_after == dense_params and layer.reason
            continue
        assert layer.rank == max(1, math.floor(min(out, inp) / 3 + 0.5))
        assert layer.params_after == layer.rank * (out + inp) + (out if bias else 0)
        expected += layer.params_after - dense_params
    assert report.params_after == expected
    unet.train()  # every factor trains, the added embedding's included
    args, kwargs = variant_inputs(unet)
    unet(*args, **kwargs).sample.square().mean().backward()
    for layer_name, module in low_rank_layers(unet).items():
        assert module.down.grad is not None and module.down.grad.abs().sum() > 0, layer_name
        assert module.up.grad is not None and module.up.grad.abs().sum() > 0, layer_name


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_save_and_load_round_trip_bit_for_bit(name, tmp_path):
    unet = variant_unet(name)
    report = elr_ext.decompose(unet, rank_ratio=0.25, split="balanced")
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    elr_ext.save_decomposed(unet, str(tmp_path))
    state = unet.state_dict()
    inputs = variant_inputs(unet)
    expected = run_variant(unet, inputs)
    assert set(unet._elr_decompose_config["layers"]) == {l.name for l in report.decomposed}
    for source in (tiny_variant_unet(name), None):  # a fresh dense model, or the stored diffusers config
        loaded = elr_ext.load_decomposed(source, str(tmp_path)).eval()
        assert count(loaded) == report.params_after
        assert loaded._elr_decompose_config == unet._elr_decompose_config
        loaded_state = loaded.state_dict()
        assert set(loaded_state) == set(state) and all(torch.equal(loaded_state[k], v) for k, v in state.items())
        attentions = [m for m in loaded.modules() if isinstance(m, Attention)]
        assert len(attentions) == VARIANT_ATTENTIONS[name]
        assert all(isinstance(m.processor, LowRankAttnProcessor) for m in attentions)
        assert loaded.config.addition_embed_type == unet.config.addition_embed_type
        assert torch.equal(run_variant(loaded, inputs), expected)
