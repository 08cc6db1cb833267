"""ELRControlPipeline on the tiny configuration: at init it samples exactly what the backbone alone
does; schedulers; output types; save/load of the whole pipeline; several conditions; errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,  # noqa: E402
                       StableDiffusionPipeline)

from elr_ext import tiny  # noqa: E402
from elr_ext.nn.control_adapter import LocalControlAdapter  # noqa: E402
from elr_ext.pipelines import ELRControlPipeline, condition_to_tensor  # noqa: E402
from helpers import perturb_zero_inits  # noqa: E402

PROMPTS = ["a red circle and a blue square on a gray background", "two green lines"]
STEPS = 3


def ddim():
    return tiny.tiny_scheduler("ddim")


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    return dict(unet=tiny.tiny_unet(), text_encoder=tiny.tiny_text_encoder(), tokenizer=tiny.tiny_tokenizer())


def pixel_pipeline(parts, scheduler=None, condition_channels=(1, 3), perturb=True):
    adapter = LocalControlAdapter.from_unet(parts["unet"], condition_channels=list(condition_channels))
    if perturb:
        perturb_zero_inits(adapter)
    return ELRControlPipeline(vae=None, adapter=adapter, scheduler=scheduler or ddim(), **parts)


def conditions(batch=1, size=32):
    g = torch.Generator().manual_seed(7)
    return [(torch.rand(batch, 1, size, size, generator=g) > 0.8).float(), torch.rand(batch, 3, size, size, generator=g)]


def generate(pipe, condition, **kw):
    kw = {"num_inference_steps": STEPS, "output_type": "pt", "generator": torch.Generator().manual_seed(3), **kw}
    return pipe(PROMPTS, condition, **kw).images


def test_tiny_tokenizer_keeps_caption_words_whole(tmp_path):
    tokenizer = tiny.tiny_tokenizer()
    assert all(len(tokenizer.tokenize(w)) == 1 for w in tiny.CAPTION_WORDS)
    from_files = tiny.tiny_tokenizer(str(tmp_path))
    assert (tmp_path / "vocab.json").exists() and (tmp_path / "merges.txt").exists()
    text = PROMPTS[0] + ", 3 zebras!"
    assert from_files(text).input_ids == tokenizer(text).input_ids
    assert len(tokenizer(PROMPTS[0]).input_ids) == 11 + 2  # words + start and end tokens


def test_zero_init_pipeline_equals_the_backbone_alone():
    """With a VAE (latent space), against diffusers' StableDiffusionPipeline on the same backbone,
    noise and scheduler: every residual is zero at init, so the images are identical."""
    torch.manual_seed(0)
    vae = tiny.tiny_vae()
    unet = tiny.tiny_unet(in_channels=4, out_channels=4, sample_size=16)
    text_encoder, tokenizer = tiny.tiny_text_encoder(), tiny.tiny_tokenizer()
    adapter = LocalControlAdapter.from_unet(unet, condition_channels=[1, 3], latent_factor=2)
    # steps_offset=1: StableDiffusionPipeline rewrites any other value to 1
    ours = ELRControlPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, adapter=adapter,
                              scheduler=DDIMScheduler.from_config(ddim().config, steps_offset=1))
    backbone = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=DDIMScheduler.from_config(ddim().config, steps_offset=1),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    latents = torch.randn(2, 4, 16, 16)
    kw = dict(num_inference_steps=STEPS, guidance_scale=5.0, output_type="pt", latents=latents)
    ours_images = ours(PROMPTS, conditions(), **kw).images
    backbone_images = backbone(PROMPTS, height=32, width=32, **kw).images
    assert ours_images.shape == (2, 3, 32, 32)
    assert torch.equal(ours_images, backbone_images)


def test_without_an_adapter_the_pipeline_is_the_backbone_alone():
    """adapter=None (a Stage I student, or the "no control" arm): the same images as diffusers'
    StableDiffusionPipeline on the backbone, and as an untrained adapter (zero residuals) gives;
    a condition given to it, or none given to a pipeline with an adapter, is an error naming it."""
    torch.manual_seed(0)
    vae = tiny.tiny_vae()
    unet = tiny.tiny_unet(in_channels=4, out_channels=4, sample_size=16)
    text_encoder, tokenizer = tiny.tiny_text_encoder(), tiny.tiny_tokenizer()
    scheduler = DDIMScheduler.from_config(ddim().config, steps_offset=1)
    alone = ELRControlPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, adapter=None,
                               scheduler=scheduler)
    backbone = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    latents = torch.randn(2, 4, 16, 16)
    kw = dict(num_inference_steps=STEPS, guidance_scale=5.0, output_type="pt", latents=latents)
    images = alone(PROMPTS, **kw).images  # the size from the UNet's sample_size x the VAE's factor
    assert images.shape == (2, 3, 32, 32)
    assert torch.equal(images, backbone(PROMPTS, height=32, width=32, **kw).images)
    adapter = LocalControlAdapter.from_unet(unet, condition_channels=[1, 3], latent_factor=2)
    controlled = ELRControlPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                    adapter=adapter, scheduler=scheduler)
    assert torch.equal(images, controlled(PROMPTS, conditions(), **kw).images)
    with pytest.raises(ValueError, match="condition was given but the pipeline has no adapter"):
        alone(PROMPTS, conditions(), **kw)
    with pytest.raises(ValueError, match="condition is required"):
        controlled(PROMPTS, **kw)
    with pytest.raises(ValueError, match="not a multiple of 8"):  # latent factor 2 x downsampling 4
        alone(PROMPTS, num_inference_steps=STEPS, height=30, width=32)


@pytest.mark.parametrize("scheduler", [DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler])
def test_schedulers_and_determinism(parts, scheduler):
    config = ddim().config
    pipe = pixel_pipeline(parts, scheduler.from_config(config))
    first = generate(pipe, conditions())
    again = generate(pipe, conditions())
    assert first.shape == (2, 3, 32, 32) and first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, again)
    # the control reaches the images, and conditioning_scale=0 gives the backbone's own sampling
    other = generate(pipe, [1 - c for c in conditions()])
    assert not torch.allclose(first, other)
    plain = generate(pipe, conditions(), conditioning_scale=0.0)
    zero_init = generate(pixel_pipeline(parts, scheduler.from_config(config), perturb=False), conditions())
    assert torch.equal(plain, zero_init) and not torch.allclose(first, plain)


def test_output_types_images_per_prompt_and_condition_formats(parts):
    pipe = pixel_pipeline(parts, condition_channels=(3,))
    condition = torch.rand(1, 3, 32, 32)
    pil = pipe(PROMPTS[0], condition, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               num_images_per_prompt=2).images
    assert len(pil) == 2 and pil[0].size == (32, 32)
    as_np = pipe(PROMPTS[0], condition, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 num_images_per_prompt=2, output_type="np").images
    assert as_np.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(np.asarray(pil[1]), (as_np[1] * 255).round().astype(np.uint8))
    # a PIL condition and a uint8 array are the same map as the float tensor they encode
    uint8 = (condition[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    from PIL import Image

    assert torch.equal(condition_to_tensor(Image.fromarray(uint8)), condition_to_tensor(uint8))
    assert condition_to_tensor(uint8).shape == (1, 3, 32, 32)
    # a condition at another size is resized to the requested image size
    images = pipe(PROMPTS[0], torch.rand(1, 3, 48, 48), num_inference_steps=2, height=32, width=32,
                  output_type="pt").images
    assert images.shape == (1, 3, 32, 32)


def test_save_load_round_trip(parts, tmp_path):
    pipe = pixel_pipeline(parts)
    before = generate(pipe, conditions(), negative_prompt="dark")
    pipe.save_pretrained(tmp_path)
    loaded = ELRControlPipeline.from_pretrained(tmp_path)
    assert loaded.vae is None and isinstance(loaded.adapter, LocalControlAdapter)
    assert type(loaded.scheduler) is type(pipe.scheduler)
    after = generate(loaded, conditions(), negative_prompt="dark")
    assert torch.equal(before, after)


def test_errors(parts):
    pipe = pixel_pipeline(parts, perturb=False)
    with pytest.raises(ValueError, match="condition has 3 channels; the adapter expects 4"):
        generate(pipe, torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="image size 30x30 is not a multiple of 4"):
        generate(pipe, [torch.rand(1, 1, 30, 30), torch.rand(1, 3, 30, 30)])
    with pytest.raises(ValueError, match="condition map 0 has batch 3"):
        generate(pipe, [torch.rand(3, 1, 32, 32), torch.rand(1, 3, 32, 32)])
    with pytest.raises(ValueError, match="latent_factor=1 but the VAE's downsampling gives 2"):
        ELRControlPipeline(vae=tiny.tiny_vae(), adapter=pipe.adapter, scheduler=ddim(), **parts)
