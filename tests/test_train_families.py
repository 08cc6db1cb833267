"""train.py on the SD 1.5- and SDXL-shaped tiny variants (--architecture tiny-sd15 / tiny-sdxl) and on
an SDXL-like --pretrained folder: every stage runs, the model folders keep both text encoders, the
family is read from the folder, SDXL's time ids come from each sample's original size and crop, and
bad folders or flags give errors that name what is wrong."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))

import train  # noqa: E402  (python/train.py)
from elr_training.config import ControlConfig, make_config  # noqa: E402
from elr_training.data.formats import SampleTransform, collate, crop_top_left  # noqa: E402
from elr_training.models import detect_family, encode_prompts, tiny_components  # noqa: E402

QUICK = ["--resolution", "16", "--train-batch-size", "2", "--num-validation-images", "2",
         "--num-inference-steps", "2", "--validation-steps", "1000", "--checkpointing-steps", "1000",
         "--synthetic-size", "4"]


def read_metrics(folder):
    with open(os.path.join(folder, "metrics.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("architecture", ["tiny-sd15", "tiny-sdxl"])
def test_the_three_stages_run_on_each_family(tmp_path, architecture, capsys):
    result = train.main(["--stage", "2", "--architecture", architecture, "--output-dir", str(tmp_path),
                         "--max-train-steps", "2", "--earlier-stage-steps", "2", "2", *QUICK])
    out = capsys.readouterr().out
    assert result["global_step"] == 2 and result["validation_edge_nmse_control"] is not None
    for stage in ("stage0", "stage1"):
        model = tmp_path / stage / "model"
        assert (model / "vae").is_dir()  # the variants work in tiny_vae's latent space
        assert (model / "text_encoder_2").is_dir() == (architecture == "tiny-sdxl")
        assert detect_family(str(model), "--backbone") == ("sdxl" if architecture == "tiny-sdxl" else "one-encoder")
    assert read_metrics(tmp_path / "stage1")["decomposition"]["layers"]
    expected_encoders = 2 if architecture == "tiny-sdxl" else 1
    assert f"{expected_encoders} text encoder(s)" in out
    assert (tmp_path / "model" / "adapter").is_dir()


@pytest.fixture(scope="module")
def sdxl_like_folder(tmp_path_factory):
    """An SDXL-like model folder as diffusers lays it out: model_index.json, unet (text_time),
    vae, two text encoders and tokenizers, a scheduler."""
    from diffusers import EulerDiscreteScheduler

    from elr_ext import tiny

    folder = tmp_path_factory.mktemp("sdxl-like")
    components = tiny_components(0, "tiny-sdxl")
    components.unet.save_pretrained(folder / "unet")
    components.vae.save_pretrained(folder / "vae")
    components.text_encoder.save_pretrained(folder / "text_encoder")
    components.text_encoder_2.save_pretrained(folder / "text_encoder_2")
    tiny.tiny_tokenizer().save_pretrained(folder / "tokenizer")
    tiny.tiny_tokenizer().save_pretrained(folder / "tokenizer_2")
    EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(
        folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    return folder


def test_sdxl_pretrained_folder_trains_stage1_then_stage2(tmp_path, sdxl_like_folder, capsys):
    assert detect_family(str(sdxl_like_folder), "--pretrained") == "sdxl"
    stage1 = train.main(["--stage", "1", "--pretrained", str(sdxl_like_folder), "--preset", "tiny",
                         "--output-dir", str(tmp_path / "s1"), "--max-train-steps", "2", *QUICK])
    assert "model family: Stable Diffusion XL" in capsys.readouterr().out
    assert stage1["global_step"] == 2
    assert (tmp_path / "s1" / "model" / "text_encoder_2").is_dir()
    # a replacement VAE (e.g. an fp16-safe one): given as a VAE folder
    stage2 = train.main(["--stage", "2", "--pretrained", str(sdxl_like_folder), "--backbone", str(tmp_path / "s1"),
                         "--pretrained-vae", str(sdxl_like_folder / "vae"), "--preset", "tiny",
                         "--output-dir", str(tmp_path / "s2"), "--max-train-steps", "2", *QUICK])
    assert "VAE: --pretrained-vae" in capsys.readouterr().out
    assert stage2["global_step"] == 2 and stage2["validation_edge_nmse_control"] is not None


def test_folders_that_are_not_a_known_family_are_refused(tmp_path, sdxl_like_folder):
    import shutil

    other = tmp_path / "flux"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="model_index.json names FluxPipeline, which is neither"):
        detect_family(str(other), "--pretrained")
    (other / "model_index.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing .*unet/config.json"):
        detect_family(str(other), "--pretrained")
    (other / "unet").mkdir()
    (other / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="unet/config.json is a UNet2DModel"):
        detect_family(str(other), "--pretrained")

    broken = tmp_path / "no-second-encoder"
    shutil.copytree(sdxl_like_folder, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match=r"text_encoder_2/config\.json"):
        train.main(["--stage", "1", "--pretrained", str(broken), "--preset", "tiny", "--output-dir",
                    str(tmp_path / "out"), "--max-train-steps", "1", *QUICK])


def test_flag_errors():
    with pytest.raises(ValueError, match="--architecture tiny-sdxl and --pretrained .*: give one"):
        make_config(ControlConfig, dict(stage=2, max_train_steps=1, architecture="tiny-sdxl", pretrained="x"))
    with pytest.raises(FileNotFoundError, match="--pretrained-vae /no/such/vae: no such folder"):
        make_config(ControlConfig, dict(stage=2, max_train_steps=1, pretrained_vae="/no/such/vae"))
    with pytest.raises(ValueError, match="--architecture 'sd21' has no tiny built-in model"):
        tiny_components(0, "sd21")


def test_sdxl_time_ids_come_from_each_samples_original_size_and_crop():
    transform = SampleTransform(16, None)
    wide = transform({"image": np.zeros((20, 40, 3), np.uint8), "caption": "a red circle"})
    tall = transform({"image": np.zeros((48, 16, 3), np.uint8), "caption": "a blue square"})
    assert wide["original_size"] == (20, 40) and wide["crop_top_left"] == crop_top_left(20, 40, 16) == (0, 8)
    assert tall["original_size"] == (48, 16) and tall["crop_top_left"] == (16, 0)
    batch = collate([wide, tall])
    components = tiny_components(0, "tiny-sdxl")
    text = encode_prompts(components, batch["captions"], "cpu", batch)
    assert text.added["time_ids"].tolist() == [[20, 40, 0, 8, 16, 16], [48, 16, 16, 0, 16, 16]]
    assert text.added["text_embeds"].shape == (2, 32) and text.states.shape[-1] == 64
    # without recorded sizes (validation): original = target = the given size, no crop
    plain = encode_prompts(components, ["a"], "cpu", size=(16, 16))
    assert plain.added["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]]
    # one-encoder families take no added conditioning
    assert encode_prompts(tiny_components(0), ["a"], "cpu").added is None
    with torch.no_grad():
        unet = components.unet
        out = unet(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), **text.unet_kwargs()).sample
    assert out.shape == (2, 4, 8, 8)
