"""train.py --cache-latents DIR (python/elr_training/data/cache.py): training from the cache gives the
losses of training without it, the build resumes where it was cut off, a cache made for another run is
refused naming what differs, and the encoders it replaces stay off the training device. Tiny latent-space
models (an SD 2.1-like and an SDXL-like folder) at 16 x 16 pixels."""

from __future__ import annotations

import json
import os
import shutil
import threading

import pytest
import torch

from test_train import run, sd_like_folder  # noqa: F401  (sd_like_folder: a fixture)
from test_train_families import sdxl_like_folder  # noqa: F401  (a fixture)

import train  # noqa: E402  (python/train.py, on the path through test_train)
from elr_training.config import ControlConfig, DistillConfig, build_parser, describe, load_yaml, make_config
from elr_training.data import cache as cache_module
from elr_training.data.cache import CacheError, FreedEncoder

# 8 synthetic scenes, batches of 2 (test_train.TINY's other settings): 4 batches per epoch, 3 steps
FEW = ("--synthetic-size", "8", "--train-batch-size", "2", "--report-to", "none", "--preset", "tiny")
STEPS = 3


def losses(metrics):
    return [value for _, value in metrics["loss_history"]["train/loss"]]


def assert_same_losses(cached, plain):
    """The same steps on the same batches, noise and timesteps: equal up to the last bits (the VAE's
    convolutions round differently when the batch they encode in holds other samples)."""
    assert len(losses(cached)) == len(losses(plain)) == STEPS
    assert losses(cached) == pytest.approx(losses(plain), rel=1e-5, abs=1e-7)
    assert cached["fixed_batch_loss_before"] == pytest.approx(plain["fixed_batch_loss_before"], rel=1e-5)
    assert cached["fixed_batch_loss_after"] == pytest.approx(plain["fixed_batch_loss_after"], rel=1e-5)


def stage2(folder, output, *extra):
    return run(2, output, "--pretrained", str(folder), *FEW, *extra, steps=STEPS, lr=1e-3)


@pytest.fixture(scope="module")
def plain_sd(tmp_path_factory, sd_like_folder):  # noqa: F811
    return stage2(sd_like_folder, tmp_path_factory.mktemp("plain-sd"))


@pytest.fixture
def captured(monkeypatch):
    """The stage of each run train.main makes (its components after set-up)."""
    stages = []
    set_up = train.set_up

    def keep(config, accelerator):
        run_, samples = set_up(config, accelerator)
        stages.append(run_.stage)
        return run_, samples

    monkeypatch.setattr(train, "set_up", keep)
    return stages


def count_calls(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


# ------------------------------------------------------------------------------------------ same losses


def test_stage2_from_the_cache_trains_as_without_it_and_frees_the_encoders(tmp_path, sd_like_folder, plain_sd,  # noqa: F811
                                                                           captured, capsys, monkeypatch):
    folder = tmp_path / "cache"
    built = stage2(sd_like_folder, tmp_path / "built", "--cache-latents", str(folder))
    out = capsys.readouterr().out
    assert f"cache {folder}: building 8 samples in 1 shards" in out
    assert "cache_latents" in out and f"'{folder}'" in out and "[cli]" in out  # printed with its source
    assert_same_losses(built, plain_sd)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["complete"] and manifest["key"]["transform"]["resolution"] == 16
    assert manifest["key"]["conditions"]["types"] == ["canny"]
    assert set(os.listdir(folder)) == {"manifest.json", "empty_caption.safetensors", "shard-00000.safetensors"}

    # the second run reads the complete cache and runs no text encoder and no VAE encoder at all
    import elr_ext.pipelines.prompts as prompts

    text_calls = count_calls(monkeypatch, prompts, "encode_text")
    shards = count_calls(monkeypatch, cache_module, "encode_shard")
    reused = stage2(sd_like_folder, tmp_path / "reused", "--cache-latents", str(folder))
    assert f"cache {folder}: complete (8 samples in 1 shards), reusing" in capsys.readouterr().out
    assert not shards and not text_calls  # validation's prompts go through the pipeline's own encoder
    assert_same_losses(reused, plain_sd)
    components = captured[-1].components
    assert isinstance(components.vae.encoder, FreedEncoder) and components.vae.quant_conv is None
    with pytest.raises(RuntimeError, match="the VAE's encoder was freed after --cache-latents"):
        components.vae.encode(torch.zeros(1, 3, 16, 16))
    assert all(p.device.type == "cpu" for e in components.text_encoders for p in e.parameters())


def test_sdxl_from_the_cache_trains_as_without_it(tmp_path, sdxl_like_folder):  # noqa: F811
    plain = stage2(sdxl_like_folder, tmp_path / "plain")
    cached = stage2(sdxl_like_folder, tmp_path / "cached", "--cache-latents", str(tmp_path / "cache"))
    assert_same_losses(cached, plain)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "cache" / "shard-00000.safetensors"), framework="pt") as f:
        assert {"text_pooled", "original_sizes", "crops_top_left", "latent_parameters"} <= set(f.keys())
        assert f.get_slice("conditions.canny").get_dtype() == "U8"  # Canny edges stored losslessly as uint8


def test_stage1_from_the_cache_trains_as_without_it_and_keeps_the_vae_encoder(tmp_path, sd_like_folder,  # noqa: F811
                                                                             captured):
    common = ("--pretrained", str(sd_like_folder), *FEW)
    plain = run(1, tmp_path / "plain", *common, steps=STEPS, lr=1e-3)
    cached = run(1, tmp_path / "cached", *common, "--cache-latents", str(tmp_path / "cache"), steps=STEPS, lr=1e-3)
    assert_same_losses(cached, plain)
    assert cached["validation_kd_mse"] == pytest.approx(plain["validation_kd_mse"], rel=1e-5)
    # stage 1 validates on encoded images and saves the VAE: its encoder stays (on the CPU)
    vae = captured[-1].components.vae
    assert not isinstance(vae.encoder, FreedEncoder) and vae.quant_conv is not None
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "cached" / "model" / "vae" / "diffusion_pytorch_model.safetensors"))
    assert any(k.startswith("encoder.") for k in saved)


def test_an_unreadable_image_stays_skipped_in_the_cache(tmp_path, sd_like_folder):  # noqa: F811
    from test_train_data import _scenes, _write_unicontrolnet

    data = tmp_path / "uni"  # 3 scenes (one with a given canny map) and a corrupt image
    _write_unicontrolnet(data, _scenes(3))
    flags = ("--data", str(data), "--train-batch-size", "2")
    plain = stage2(sd_like_folder, tmp_path / "plain", *flags)
    cached = stage2(sd_like_folder, tmp_path / "cached", *flags, "--cache-latents", str(tmp_path / "cache"))
    assert_same_losses(cached, plain)
    assert cached["skipped_images"] == plain["skipped_images"] > 0  # the unreadable image stays skipped and counted
    anno = data / "anno.txt"
    anno.write_text(anno.read_text().replace("\t", "\ta picture of ", 1))  # another caption
    with pytest.raises(CacheError, match=r"made for another list of files and captions"):
        stage2(sd_like_folder, tmp_path / "again", *flags, "--cache-latents", str(tmp_path / "cache"))


def test_place_models_leaves_the_encoders_off_the_device(sd_like_folder):  # noqa: F811
    from elr_training.models import load_components
    from elr_training.stages import ControlStage

    config, _ = make_config(ControlConfig, dict(max_train_steps=1, pretrained=str(sd_like_folder), preset="tiny",
                                                resolution=16, cache_latents="unused"))
    components = load_components(str(sd_like_folder), "--pretrained", require_vae=True)
    stage = ControlStage(config, components, torch.device("cpu"), lambda *a: None)
    cache_module.free_vae_encoder(components.vae)
    meta = torch.device("meta")  # a stand-in accelerator: what moved there shows
    model = train.place_models(config, stage, components, meta, encoders_on_device=False)
    assert next(model.parameters()).device == meta and next(stage.unet.parameters()).device == meta
    assert next(components.vae.decoder.parameters()).device == meta  # validation decodes on the device
    assert all(p.device.type == "cpu" for p in components.text_encoder.parameters())
    # validation takes the text encoder to the device and back (recorded: nothing comes back from meta)
    moves = []
    components.text_encoder.to = lambda device: moves.append(str(device))
    with cache_module.encoders_for_validation(components, meta):
        assert moves == ["meta"]
    assert moves == ["meta", "cpu"]


# ------------------------------------------------------------------------------------------ resuming


def test_an_interrupted_build_resumes_without_encoding_complete_shards(tmp_path, sd_like_folder, plain_sd,  # noqa: F811
                                                                      monkeypatch, capsys):
    monkeypatch.setattr(cache_module, "SAMPLES_PER_SHARD", 2)  # 8 samples in 4 shards
    folder = tmp_path / "cache"
    encode = cache_module.encode_shard
    encoded = []

    def cut_after_two(*args, **kwargs):
        if len(encoded) == 2:
            raise KeyboardInterrupt  # the build stopped here
        encoded.append(args[1])
        return encode(*args, **kwargs)

    monkeypatch.setattr(cache_module, "encode_shard", cut_after_two)
    with pytest.raises(KeyboardInterrupt):
        stage2(sd_like_folder, tmp_path / "cut", "--cache-latents", str(folder))
    assert encoded == [0, 1] and not json.loads((folder / "manifest.json").read_text())["complete"]
    (folder / "shard-00002.safetensors.tmp").write_bytes(b"half a shard")  # what a crash mid-write leaves
    before = {n: os.stat(folder / n).st_mtime_ns for n in ("shard-00000.safetensors", "shard-00001.safetensors")}

    encoded.clear()
    monkeypatch.setattr(cache_module, "encode_shard", lambda *a, **k: (encoded.append(a[1]), encode(*a, **k))[1])
    resumed = stage2(sd_like_folder, tmp_path / "resumed", "--cache-latents", str(folder))
    assert f"cache {folder}: resuming: 2 of 4 shards done" in capsys.readouterr().out
    assert encoded == [2, 3]  # only the missing shards
    assert {n: os.stat(folder / n).st_mtime_ns for n in before} == before
    assert not list(folder.glob("*.tmp"))
    assert json.loads((folder / "manifest.json").read_text())["complete"]
    assert_same_losses(resumed, plain_sd)  # 4 shards of 2 read as 1 of 8: the same batches


def test_processes_split_the_build_and_the_main_one_completes_it(tmp_path, monkeypatch):
    """Two processes, as threads with a barrier: each encodes the shards i % 2 == rank, once."""
    from elr_training.data import condition_maker_for
    from elr_training.models import tiny_components

    monkeypatch.setattr(cache_module, "SAMPLES_PER_SHARD", 2)
    config, _ = make_config(ControlConfig, dict(max_train_steps=1, resolution=16, synthetic_size=10,
                                                train_batch_size=2, cache_latents=str(tmp_path / "cache")))
    components = tiny_components(0, "tiny-sd15")
    encode, by_rank, barrier, caches = cache_module.encode_shard, {}, threading.Barrier(2, timeout=60), {}

    def recorded(*args, **kwargs):
        by_rank.setdefault(threading.current_thread().name, []).append(args[1])
        return encode(*args, **kwargs)

    monkeypatch.setattr(cache_module, "encode_shard", recorded)

    def process(rank):
        caches[rank] = cache_module.prepare_cache(config, components, condition_maker_for(config), "cpu",
                                                  say=lambda *a: None, rank=rank, world_size=2, wait=barrier.wait)

    threads = [threading.Thread(target=process, args=(rank,), name=str(rank)) for rank in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert by_rank == {"0": [0, 2, 4], "1": [1, 3]}, by_rank
    assert len(caches[0]) == len(caches[1]) == 10 and caches[0].manifest["complete"]
    assert caches[0][9]["caption"] == caches[1][9]["caption"]


# ------------------------------------------------------------------------------------------ refusals


def test_flag_is_in_help_and_yaml_and_webdataset_is_refused(tmp_path):
    assert "--cache-latents" in build_parser(ControlConfig).format_help()
    assert "--cache-latents" in build_parser(DistillConfig).format_help()
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(f"cache_latents: {tmp_path / 'cache'}\nmax_train_steps: 1\n")
    loaded = load_yaml(str(yaml_file), ControlConfig)
    config, sources = make_config(ControlConfig, loaded, sources={k: "yaml" for k in loaded})
    line = next(x for x in describe(config, sources).splitlines() if x.strip().startswith("cache_latents "))
    assert str(tmp_path / "cache") in line and line.rstrip().endswith("[yaml]")
    assert make_config(ControlConfig, dict(max_train_steps=1))[0].cache_latents is None
    shard = tmp_path / "shard-0.tar"
    shard.write_bytes(b"")
    with pytest.raises(ValueError, match="--cache-latents needs a data set with an index .* webdataset shards"):
        make_config(ControlConfig, dict(max_train_steps=1, data=str(shard), cache_latents=str(tmp_path / "c")))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(CacheError, match="--cache-latents .*a-file: is a file, not a folder"):
        make_config(ControlConfig, dict(max_train_steps=1, cache_latents=str(tmp_path / "a-file")))


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory, sd_like_folder):  # noqa: F811
    """A complete cache of the SD 2.1-like model's stage 2 (16 px, canny, 8 scenes), and the flags it was made with."""
    folder = tmp_path_factory.mktemp("built") / "cache"
    config, _ = make_config(ControlConfig, dict(max_train_steps=1, pretrained=str(sd_like_folder), preset="tiny",
                                                resolution=16, synthetic_size=8, train_batch_size=2,
                                                cache_latents=str(folder)))
    from elr_training.data import condition_maker_for
    from elr_training.models import load_components

    components = load_components(str(sd_like_folder), "--pretrained", require_vae=True)
    cache_module.prepare_cache(config, components, condition_maker_for(config), "cpu", say=lambda *a: None)
    return folder, dict(pretrained=str(sd_like_folder), preset="tiny", synthetic_size=8, train_batch_size=2,
                        resolution=16)


@pytest.mark.parametrize("change, message", [
    (dict(resolution=24), r"made for resolution 16, this run trains at 24"),
    (dict(condition_types=["canny", "sketch"]),
     r"made for condition types \['canny'\], this run uses \['canny', 'sketch'\] \(--condition-types\)"),
    (dict(canny_low_threshold=50), r"made with canny.low_threshold = 100, this run has 50"),
    (dict(synthetic_size=16), r"made for data size 8, this run has 16"),
    (dict(mixed_precision="bf16"), r"made with the frozen models in float32, this run has them in bfloat16"),
])
def test_a_cache_made_for_other_settings_is_refused_before_the_models_load(built_cache, change, message):
    folder, flags = built_cache
    values = {**flags, "max_train_steps": 1, "cache_latents": str(folder), **change}
    with pytest.raises(CacheError, match=rf"--cache-latents {folder}: the cache there \(complete, 8 samples\) was "
                                         rf"made for another run: {message}.*delete {folder} to build it anew"):
        make_config(ControlConfig, values)
    # a stage without conditions is another run too
    with pytest.raises(CacheError, match=r"made for condition types \['canny'\], this run uses none"):
        make_config(DistillConfig, dict(flags, max_train_steps=1, cache_latents=str(folder)))


def test_a_cache_made_for_another_model_is_refused_before_any_step(tmp_path, built_cache, monkeypatch):
    from elr_ext import tiny

    folder, flags = built_cache
    torch.manual_seed(1)
    tiny.tiny_vae().save_pretrained(tmp_path / "other-vae")  # the same VAE config, other weights
    monkeypatch.setattr(train, "train_loop", lambda *a, **k: pytest.fail("a training step ran"))
    with pytest.raises(CacheError, match=rf"--cache-latents {folder}: .*from the model .*made with another VAE "
                                         r"than this run's \(the weights of its encoder differ\)"):
        stage2(flags["pretrained"], tmp_path / "out", "--cache-latents", str(folder),
               "--pretrained-vae", str(tmp_path / "other-vae"))
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_a_damaged_shard_or_manifest_is_refused_saying_what_to_do(tmp_path, built_cache, monkeypatch):
    folder, flags = built_cache
    copy = tmp_path / "cache"
    shutil.copytree(folder, copy)
    shard = copy / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    monkeypatch.setattr(train, "train_loop", lambda *a, **k: pytest.fail("a training step ran"))
    with pytest.raises(CacheError, match=r"--cache-latents .*: shard-00000.safetensors is damaged \(.*\); delete that "
                                         r"file and run again, which encodes it anew"):
        stage2(flags["pretrained"], tmp_path / "out", "--cache-latents", str(copy))
    (copy / "manifest.json").write_text('{"key": {"version": 1}, "lay')
    with pytest.raises(CacheError, match=r"--cache-latents .*manifest.json cannot be read .*delete .* to build the "
                                         r"cache anew"):
        make_config(ControlConfig, dict(flags, max_train_steps=1, cache_latents=str(copy)))
    (copy / "manifest.json").unlink()
    with pytest.raises(CacheError, match=r"holds 1 shard file\(s\) but no manifest.json"):
        stage2(flags["pretrained"], tmp_path / "out", "--cache-latents", str(copy))


def test_condition_maps_are_stored_losslessly():
    edges = (torch.rand(3, 1, 8, 8) > 0.5).float()
    given = torch.randint(0, 256, (3, 3, 8, 8)).float() / 255  # colour maps read from files
    sketch = torch.rand(3, 1, 8, 8)  # XDoG lines take any value
    for maps, dtype in ((edges, torch.uint8), (given, torch.uint8), (sketch, torch.float32)):
        stored = cache_module.to_stored_map(maps)
        assert stored.dtype == dtype
        assert torch.equal(cache_module.from_stored_map(stored), maps)
