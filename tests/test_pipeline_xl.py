"""ELRControlXLPipeline on the tiny SDXL-shaped model: without control (no adapter, or an untrained
one) it samples exactly what diffusers' StableDiffusionXLPipeline samples; the control reaches both
guidance branches; save/load of the whole pipeline; the fp16 VAE decodes in fp32; errors."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline  # noqa: E402

from elr_ext import tiny  # noqa: E402
from elr_ext.nn.control_adapter import LocalControlAdapter  # noqa: E402
from elr_ext.pipelines import ELRControlPipeline, ELRControlXLPipeline, control_pipeline_class  # noqa: E402
from elr_ext.pipelines.prompts import encode_text  # noqa: E402
from helpers import perturb_zero_inits  # noqa: E402

PROMPTS = ["a red circle and a blue square on a gray background", "two green lines"]
STEPS = 2
SIZE = 32  # tiny_vae's factor 2 x the UNet's sample_size 16


def ddim():
    # steps_offset=1, as the Stable Diffusion checkpoints' schedulers
    return DDIMScheduler.from_config(tiny.tiny_scheduler("ddim").config, steps_offset=1)


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    text_encoder, text_encoder_2 = tiny.tiny_variant_text_encoders("tiny-sdxl")
    tokenizer = tiny.tiny_tokenizer()
    return dict(vae=tiny.tiny_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                tokenizer_2=tokenizer, unet=tiny.tiny_variant_unet("tiny-sdxl"))


def make_adapter(unet, perturb=False, latent_factor=2):
    adapter = LocalControlAdapter.from_unet(unet, condition_channels=[1, 3], latent_factor=latent_factor)
    if perturb:
        perturb_zero_inits(adapter)
    return adapter


def conditions(batch=1, size=SIZE):
    g = torch.Generator().manual_seed(7)
    edges = (torch.rand(batch, 1, size, size, generator=g) > 0.8).float()
    return [edges, torch.rand(batch, 3, size, size, generator=g)]


def noise(images=2, channels=4, size=SIZE // 2):
    return torch.randn(images, channels, size, size, generator=torch.Generator().manual_seed(3))


def pipelines(parts, adapter, scheduler=DDIMScheduler, force_zeros=True):
    """(ours, diffusers' StableDiffusionXLPipeline) on the same components, each with its own scheduler."""
    config = ddim().config
    ours = ELRControlXLPipeline(adapter=adapter, scheduler=scheduler.from_config(config),
                                force_zeros_for_empty_prompt=force_zeros, **parts)
    reference = StableDiffusionXLPipeline(scheduler=scheduler.from_config(config), add_watermarker=False,
                                          force_zeros_for_empty_prompt=force_zeros, **parts)
    for pipe in (ours, reference):
        pipe.set_progress_bar_config(disable=True)
    return ours, reference


def assert_same_output(ours, reference, condition, **kw):
    kw = {"num_inference_steps": STEPS, "output_type": "latent", "latents": noise(), **kw}
    images = ours(PROMPTS, condition, **kw).images
    expected = reference(PROMPTS, height=SIZE, width=SIZE, **kw).images
    assert images.shape == expected.shape
    assert torch.equal(images, expected), kw
    return images


def test_without_an_adapter_it_is_diffusers_sdxl(parts):
    """adapter=None: the latents, and the images the tiny VAE decodes, are exactly
    StableDiffusionXLPipeline's for the same backbone, noise and scheduler: with and without
    guidance, with a negative prompt or SDXL's zeros for the unconditional branch (and with
    force_zeros_for_empty_prompt off), several images per prompt, explicit micro-conditioning."""
    ours, reference = pipelines(parts, adapter=None)
    for case in [dict(guidance_scale=1.0), dict(guidance_scale=5.0), dict(guidance_scale=5.0, negative_prompt="dark"),
                 dict(guidance_scale=5.0, num_images_per_prompt=2, latents=noise(4)),
                 dict(guidance_scale=5.0, original_size=(64, 48), crops_coords_top_left=(4, 2), target_size=(40, 32))]:
        assert_same_output(ours, reference, None, **case)
    images = assert_same_output(ours, reference, None, guidance_scale=5.0, output_type="pt")
    assert tuple(images.shape) == (2, 3, SIZE, SIZE)
    assert_same_output(*pipelines(parts, adapter=None, force_zeros=False), None, guidance_scale=5.0)


def test_prompt_2_and_negative_prompt_2_are_diffusers(parts):
    """text_encoder_2 reads prompt_2 / negative_prompt_2 when given, one text for all prompts or one
    each: the same latents as StableDiffusionXLPipeline; they change the output; negative_prompt_2
    has no effect where the unconditional branch is zeros (as in diffusers)."""
    ours, reference = pipelines(parts, adapter=None)
    kw = dict(num_inference_steps=STEPS, output_type="latent", guidance_scale=5.0)
    plain = ours(PROMPTS, None, latents=noise(), **kw).images
    second = ["blue stripes", "a yellow star"]
    for case in [dict(prompt_2=second), dict(prompt_2=["blue stripes"] * 2, negative_prompt="dark"),
                 dict(negative_prompt="dark", negative_prompt_2=["blurry", "noisy"]),
                 dict(prompt_2=second, negative_prompt=["dark", "dim"], negative_prompt_2="blurry",
                      num_images_per_prompt=2, latents=noise(4))]:
        images = assert_same_output(ours, reference, None, **case)
        if "latents" not in case:
            assert not torch.equal(images, plain), case
    # one text for all prompts (diffusers' own prompt_2 takes a list here: a single text is one prompt's)
    one = ours(PROMPTS, None, latents=noise(), prompt_2="blue stripes", negative_prompt="dark", **kw).images
    each = ours(PROMPTS, None, latents=noise(), prompt_2=["blue stripes"] * 2, negative_prompt="dark", **kw).images
    assert torch.equal(one, each)
    zeros = ours(PROMPTS, None, latents=noise(), negative_prompt_2="blurry", **kw).images
    assert torch.equal(zeros, plain)
    assert_same_output(*pipelines(parts, adapter=None, force_zeros=False), None, guidance_scale=5.0,
                       negative_prompt_2="blurry")
    with torch.no_grad():  # both encoders read the same texts when prompt_2 is None
        text = ours.encode_prompt(PROMPTS, "cpu", 1, guidance=False)
        same = ours.encode_prompt(PROMPTS, "cpu", 1, guidance=False, prompt_2=PROMPTS)
    assert torch.equal(text.states, same.states) and torch.equal(text.pooled, same.pooled)


@pytest.mark.parametrize("scheduler", [DDIMScheduler, EulerDiscreteScheduler])
def test_a_fresh_adapter_is_diffusers_sdxl(parts, scheduler):
    """An adapter at init gives zero residuals: the same sampling as the backbone alone in
    diffusers' StableDiffusionXLPipeline, with and without guidance."""
    ours, reference = pipelines(parts, make_adapter(parts["unet"]), scheduler)
    assert_same_output(ours, reference, conditions(), guidance_scale=1.0)
    assert_same_output(ours, reference, conditions(), guidance_scale=5.0, output_type="pt")


def test_control_changes_the_output_and_is_in_both_branches(parts):
    """A trained (here: perturbed) adapter changes the images; conditioning_scale=0 gives the
    backbone's sampling. With guidance the adapter sees the same condition for both halves of the
    batch, its residuals reach the UNet in the unconditional half as well, and it gets the same
    added conditioning (pooled embedding, time ids) as the UNet."""
    adapter = make_adapter(parts["unet"], perturb=True)
    pipe = ELRControlXLPipeline(adapter=adapter, scheduler=ddim(), **parts)
    backbone = ELRControlXLPipeline(adapter=None, scheduler=ddim(), **parts)
    kw = dict(num_inference_steps=STEPS, guidance_scale=5.0, output_type="latent")
    plain = backbone(PROMPTS, latents=noise(), **kw).images

    seen = {"adapter": [], "unet": []}

    def record(name):
        def hook(module, args, kwargs):
            seen[name].append((args, kwargs))
        return hook

    handles = [adapter.register_forward_pre_hook(record("adapter"), with_kwargs=True),
               parts["unet"].register_forward_pre_hook(record("unet"), with_kwargs=True)]
    try:
        controlled = pipe(PROMPTS, conditions(), latents=noise(), **kw).images
    finally:
        for handle in handles:
            handle.remove()
    assert not torch.allclose(controlled, plain)
    assert len(seen["adapter"]) == len(seen["unet"]) == STEPS
    edges, segmentation = conditions()
    for (a_args, a_kwargs), (_, u_kwargs) in zip(seen["adapter"], seen["unet"]):
        sample, _, text_states, condition = a_args
        assert sample.shape[0] == 2 * len(PROMPTS)
        assert torch.equal(condition[0], edges.expand(4, -1, -1, -1))
        assert torch.equal(condition[1], segmentation.expand(4, -1, -1, -1))
        assert torch.equal(text_states, u_kwargs["encoder_hidden_states"])
        for key in ("text_embeds", "time_ids"):
            assert torch.equal(a_kwargs["added_cond_kwargs"][key], u_kwargs["added_cond_kwargs"][key])
        mid = u_kwargs["mid_block_additional_residual"]
        uncond, cond = mid.chunk(2)
        assert uncond.abs().amax() > 0 and cond.abs().amax() > 0
        # the same condition and latents in both halves: the residuals differ only through the text
        assert not torch.equal(uncond, cond)

    assert torch.equal(pipe(PROMPTS, conditions(), latents=noise(), conditioning_scale=0.0, **kw).images, plain)
    other = pipe(PROMPTS, [1 - c for c in conditions()], latents=noise(), **kw).images
    assert not torch.allclose(other, controlled)


def test_save_load_round_trip_in_pixel_space(tmp_path):
    """vae=None (an SDXL-shaped UNet on 3-channel pixels), a perturbed adapter and
    force_zeros_for_empty_prompt=False survive save_pretrained / from_pretrained: the same images."""
    torch.manual_seed(0)
    unet = tiny.tiny_variant_unet("tiny-sdxl", in_channels=3, out_channels=3, sample_size=SIZE)
    text_encoder, text_encoder_2 = tiny.tiny_variant_text_encoders("tiny-sdxl")
    pipe = ELRControlXLPipeline(vae=None, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                tokenizer=tiny.tiny_tokenizer(), tokenizer_2=tiny.tiny_tokenizer(), unet=unet,
                                adapter=make_adapter(unet, perturb=True, latent_factor=1),
                                scheduler=EulerDiscreteScheduler.from_config(ddim().config),
                                force_zeros_for_empty_prompt=False)
    kw = dict(num_inference_steps=STEPS, guidance_scale=4.0, output_type="pt", latents=noise(2, 3, SIZE))
    before = pipe(PROMPTS, conditions(), **kw).images
    assert before.shape == (2, 3, SIZE, SIZE) and before.min() >= 0 and before.max() <= 1
    pipe.save_pretrained(tmp_path)
    loaded = ELRControlXLPipeline.from_pretrained(tmp_path)
    assert loaded.vae is None and isinstance(loaded.adapter, LocalControlAdapter)
    assert type(loaded.scheduler) is EulerDiscreteScheduler
    assert loaded.config.force_zeros_for_empty_prompt is False
    assert torch.equal(loaded(PROMPTS, conditions(), **kw).images, before)


def test_fp16_vae_decodes_in_fp32(parts):
    """An fp16 VAE with force_upcast (SDXL's own) decodes in fp32 and is fp16 again afterwards: the
    images are those of the fp32 copy of its weights. One with force_upcast=False (a VAE made safe
    in fp16) decodes in fp16."""
    vae16 = copy.deepcopy(parts["vae"]).half()
    assert vae16.config.force_upcast
    common = {k: v for k, v in parts.items() if k != "vae"}
    kw = dict(num_inference_steps=STEPS, guidance_scale=5.0, output_type="pt")
    seen = []
    handle = vae16.decoder.register_forward_pre_hook(
        lambda module, args: seen.append((args[0].dtype, module.conv_in.weight.dtype)))
    try:
        images = ELRControlXLPipeline(vae=vae16, adapter=None, scheduler=ddim(), **common)(
            PROMPTS, latents=noise(), **kw).images
    finally:
        handle.remove()
    assert seen == [(torch.float32, torch.float32)]
    assert vae16.dtype == torch.float16
    vae32 = copy.deepcopy(vae16).float()
    expected = ELRControlXLPipeline(vae=vae32, adapter=None, scheduler=ddim(), **common)(
        PROMPTS, latents=noise(), **kw).images
    assert images.dtype == torch.float32 and torch.equal(images, expected)

    safe16 = tiny.tiny_vae(force_upcast=False)
    safe16.load_state_dict(parts["vae"].state_dict())
    safe16.half()
    seen.clear()
    handle = safe16.decoder.register_forward_pre_hook(
        lambda module, args: seen.append((args[0].dtype, module.conv_in.weight.dtype)))
    try:
        images16 = ELRControlXLPipeline(vae=safe16, adapter=None, scheduler=ddim(), **common)(
            PROMPTS, latents=noise(), **kw).images
    finally:
        handle.remove()
    assert seen == [(torch.float16, torch.float16)]
    assert (images16.float() - expected).abs().max() < 0.05


def test_control_pipeline_class():
    assert control_pipeline_class(tiny.tiny_variant_unet("tiny-sdxl")) is ELRControlXLPipeline
    assert control_pipeline_class(tiny.tiny_variant_unet("tiny-sd15")) is ELRControlPipeline
    assert control_pipeline_class(tiny.tiny_unet()) is ELRControlPipeline


def test_errors(parts):
    unet = parts["unet"]
    with pytest.raises(ValueError, match="text_encoder_2, tokenizer_2 missing"):
        ELRControlXLPipeline(**{**parts, "text_encoder_2": None, "tokenizer_2": None}, adapter=None, scheduler=ddim())
    with pytest.raises(ValueError, match="use ELRControlXLPipeline with text_encoder_2"):
        ELRControlPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                           unet=unet, adapter=None, scheduler=ddim())
    with pytest.raises(ValueError, match="not 'text_time'\\); use ELRControlPipeline"):
        ELRControlXLPipeline(**{**parts, "unet": tiny.tiny_variant_unet("tiny-sd15")}, adapter=None,
                             scheduler=ddim())
    with pytest.raises(ValueError, match="second text encoder must give a pooled projection"):
        ELRControlXLPipeline(**{**parts, "text_encoder_2": tiny.tiny_text_encoder()}, adapter=None, scheduler=ddim())
    with pytest.raises(ValueError, match=r"hidden size \(32 \+ 64\) does not match the UNet's cross_attention_dim 64"):
        ELRControlXLPipeline(**{**parts, "text_encoder_2": tiny.tiny_text_encoder(projection=True, hidden_size=64)},
                             adapter=None, scheduler=ddim())
    with pytest.raises(ValueError, match="latent_factor=1 but the VAE's downsampling gives 2"):
        ELRControlXLPipeline(**parts, adapter=make_adapter(unet, latent_factor=1), scheduler=ddim())

    pipe = ELRControlXLPipeline(**parts, adapter=make_adapter(unet), scheduler=ddim())
    kw = dict(num_inference_steps=1, output_type="latent")
    with pytest.raises(ValueError, match="condition has 3 channels; the adapter expects 4"):
        pipe(PROMPTS, torch.rand(1, 3, SIZE, SIZE), **kw)
    with pytest.raises(ValueError, match=r"latents has shape \[2, 4, 8, 8\]; expected \[2, 4, 16, 16\]"):
        pipe(PROMPTS, conditions(), latents=torch.randn(2, 4, 8, 8), **kw)
    with pytest.raises(ValueError, match="image size 36x36 is not a multiple of 8"):
        pipe(PROMPTS, conditions(size=36), **kw)
    with pytest.raises(ValueError, match=r"original_size must be \(height, width\)"):
        pipe(PROMPTS, conditions(), original_size=(32, 32, 3), **kw)
    with pytest.raises(ValueError, match="negative_prompt has 3 entries for 2 prompts"):
        pipe(PROMPTS, conditions(), negative_prompt=["a", "b", "c"], **kw)
    with pytest.raises(ValueError, match="condition is required"):
        pipe(PROMPTS, **kw)
    with pytest.raises(ValueError, match="prompt_2 has 1 entries for 2 prompts"):
        pipe(PROMPTS, conditions(), prompt_2=["one"], **kw)
    with pytest.raises(ValueError, match="negative_prompt_2 has 3 entries for 2 prompts"):
        pipe(PROMPTS, conditions(), negative_prompt="dark", negative_prompt_2=["a", "b", "c"], **kw)
    with pytest.raises(ValueError, match="prompt_2 must hold texts, got int 3"):
        pipe(PROMPTS, conditions(), prompt_2=["one", 3], **kw)
    with pytest.raises(ValueError, match="prompts_2 is for the second of two text encoders"):
        encode_text([parts["tokenizer"]], [parts["text_encoder"]], ["a"], "cpu", prompts_2=["b"])
