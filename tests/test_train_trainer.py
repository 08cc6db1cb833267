"""What a diffusers user expects of train.py beside the method: --use-ema, --report-to (TensorBoard and
wandb offline, through accelerate's trackers), --validation-image pairs, --allow-tf32,
--set-grads-to-none, and launch mistakes. Tiny runs at 16 x 16 pixels (seconds each)."""

import glob
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers import read_wandb_records
from test_train import REPO, TINY, read_metrics, run, student, teacher  # noqa: F401  (fixtures)

import train  # noqa: E402  (python/train.py, on the path through test_train)
from elr_training.config import ControlConfig, TeacherConfig, build_parser, describe, load_yaml, make_config

NEW_FLAGS = {  # field -> a value that is not its default (for the YAML and --help checks)
    "report_to": "none",
    "tracker_project_name": "my-project",
    "use_ema": True,
    "ema_decay": 0.99,
    "allow_tf32": True,
    "set_grads_to_none": False,
    "validation_image": ["a.png"],
    "validation_prompt": ["a red square"],
    "validation_condition_type": ["canny"],
}


def edge_map(path, size=24, seed=0):
    """A white-on-black square outline, as a user's edge map would be."""
    image = np.zeros((size, size), np.uint8)
    lo, hi = 4 + seed, size - 5 - seed
    image[lo, lo:hi] = image[hi, lo:hi] = image[lo:hi, lo] = image[lo:hi, hi] = 255
    Image.fromarray(image).save(path)
    return str(path)


# ------------------------------------------------------------------------------------------ flags


def test_every_new_flag_is_in_help_and_yaml_and_printed_with_its_source(tmp_path):
    help_text = build_parser(ControlConfig).format_help()
    for name in NEW_FLAGS:
        assert "--" + name.replace("_", "-") in help_text, name
    assert "--no-set-grads-to-none" in help_text and "set_to_none=True" in help_text.replace("\n", " ")
    image = edge_map(tmp_path / "a.png")
    yaml_file = tmp_path / "run.yaml"
    values = dict(NEW_FLAGS, validation_image=[image], max_train_steps=1)
    yaml_file.write_text("\n".join(f"{k}: {v!r}" if not isinstance(v, bool) else f"{k}: {str(v).lower()}"
                                   for k, v in values.items()))
    loaded = load_yaml(str(yaml_file), ControlConfig)
    config, sources = make_config(ControlConfig, loaded, sources={k: "yaml" for k in loaded})
    printed = describe(config, sources)
    for name, value in values.items():
        assert getattr(config, name) == value, name
        line = next(line for line in printed.splitlines() if line.strip().startswith(name + " "))
        assert line.rstrip().endswith("[yaml]"), line
    defaults, _ = make_config(ControlConfig, dict(max_train_steps=1))
    assert (defaults.report_to, defaults.use_ema, defaults.set_grads_to_none, defaults.allow_tf32) == (
        "tensorboard", False, True, False)


@pytest.mark.parametrize("values, message", [
    (dict(report_to="mlflow"), "--report-to must be one of"),
    (dict(ema_decay=1.0), "--ema-decay must be in"),
    (dict(validation_image=["missing.png"], validation_prompt=["x"]), "--validation-image missing.png: no such file"),
    (dict(validation_prompt=["x"]), "--validation-prompt without --validation-image"),
    (dict(validation_image=["A"]), "--validation-image needs --validation-prompt"),
    (dict(validation_image=["A", "A"], validation_prompt=["x", "y", "z"]), "2 images and --validation-prompt 3"),
    (dict(validation_image=["A"], validation_prompt=["x"], validation_condition_type=["seg"]),
     r"--validation-condition-type \['seg'\]: not among the trained"),
    (dict(validation_image=["A"], validation_prompt=["x"], condition_types=["canny", "seg"]),
     "say which of --condition-types"),
])
def test_bad_input_is_refused_naming_the_flag_before_training(tmp_path, values, message):
    image = edge_map(tmp_path / "a.png")
    values = {k: [image if v == "A" else v for v in x] if isinstance(x, list) and k == "validation_image" else x
              for k, x in values.items()}
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        make_config(ControlConfig, dict(max_train_steps=1, **values))


def test_undecodable_validation_image_is_refused(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    with pytest.raises(ValueError, match=f"--validation-image {broken}: cannot be decoded"):
        make_config(ControlConfig, dict(max_train_steps=1, validation_image=[str(broken)], validation_prompt=["x"]))


def test_wandb_missing_says_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ImportError, match="--report-to all needs wandb"):
        make_config(TeacherConfig, dict(stage=0, max_train_steps=1, report_to="all"))


def test_allow_tf32_applies_for_the_run_only():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    config, _ = make_config(ControlConfig, dict(max_train_steps=1, allow_tf32=True))
    with train.reproducible(config):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    config, _ = make_config(ControlConfig, dict(max_train_steps=1))
    with train.reproducible(config):
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


@pytest.mark.parametrize("to_none", [True, False])
def test_set_grads_to_none_after_each_optimiser_step(to_none):
    from accelerate import Accelerator

    from elr_training.loop import LoopState, Training, micro_step

    class Stage:
        def loss(self, model, batch, generator):
            loss = model(torch.ones(1, 3)).square().sum()
            return loss, {"loss": loss.item()}

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    params = list(model.parameters())
    run = Training(Stage(), model, params, optimizer, None, None, 1, None, 0.0, 0, 1, 0, 0,
                   set_grads_to_none=to_none)
    before = [p.detach().clone() for p in params]
    micro_step(run, LoopState(), accelerator, {"n": 1})
    assert all(not torch.equal(b, p) for b, p in zip(before, params))  # the step happened
    if to_none:
        assert all(p.grad is None for p in params)
    else:
        assert all(p.grad is not None and not p.grad.any() for p in params)


# ------------------------------------------------------------------------------------------ trackers


def test_report_to_all_reaches_tensorboard_and_wandb_offline(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run(0, tmp_path, "--report-to", "all", "--tracker-project-name", "proj", "--validation-steps", "2", steps=2)
    events = EventAccumulator(glob.glob(str(tmp_path / "logs" / "proj" / "events.*"))[0])
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr"} <= set(tags["scalars"]) and "validation/grid" in tags["images"]
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert "config/text_summary" in tags["tensors"]  # describe(), with each value's source
    assert glob.glob(str(tmp_path / "logs" / "proj" / "*" / "hparams.yml"))

    (run_file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = read_wandb_records(run_file)
    config = {item.key: item.value_json for r in records if r.HasField("config") for item in r.config.update}
    assert config["report_to"] == '"all"' and config["stage"] == "0" and config["max_train_steps"] == "2"
    history = [{item.key or "/".join(item.nested_key): item.value_json for item in r.history.item}
               for r in records if r.HasField("history")]
    assert [h["_step"] for h in history if "train/loss" in h] == ["1", "2"]
    assert any("validation/grid/filenames" in h for h in history)
    assert glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "files" / "media" / "images" / "validation" / "*.png"))


def test_report_to_none_writes_no_tracker_files_but_keeps_the_curves(tmp_path):
    metrics = run(0, tmp_path, "--report-to", "none", steps=1)
    assert not os.path.exists(tmp_path / "logs") and not os.path.exists(tmp_path / "wandb")
    assert os.path.isfile(tmp_path / "loss_curves.png") and metrics["loss_history"]["train/loss"]


# ------------------------------------------------------------------------------------------ EMA


def test_ema_follows_diffusers_schedule_and_the_model_is_saved_averaged(tmp_path):
    metrics = run(0, tmp_path, "--use-ema", "--ema-decay", "0.5", "--checkpointing-steps", "1", steps=3, lr=3e-3)
    assert metrics["ema"]["steps"] == 3 and metrics["ema"]["decay"] == 0.5
    raw = [load_file(tmp_path / "checkpoints" / f"checkpoint-{k}" / "model.safetensors") for k in (1, 2, 3)]
    ema = load_file(tmp_path / "checkpoints" / "checkpoint-3" / "ema.safetensors")
    assert set(ema) == set(raw[0])
    saved = load_file(tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    for name, value in ema.items():
        # d_1 = 0, d_2 = min(0.5, 2/11), d_3 = min(0.5, 3/12): what EMAModel's warm-up gives
        e1 = raw[0][name].double()
        e2 = 2 / 11 * e1 + 9 / 11 * raw[1][name].double()
        e3 = 0.25 * e2 + 0.75 * raw[2][name].double()
        torch.testing.assert_close(value.double(), e3, rtol=1e-6, atol=1e-7)
        assert torch.equal(saved[name], value), name  # the saved model is the average
    assert any(not torch.equal(ema[n], raw[2][n]) for n in ema)  # and not the raw weights


def test_averaged_swaps_the_average_in_for_the_block_and_restores_the_raw_weights():
    from types import SimpleNamespace

    from elr_training.ema import averaged, make_ema

    layer = torch.nn.Linear(3, 2)
    params = list(layer.parameters())
    ema = make_ema(SimpleNamespace(use_ema=True, ema_decay=0.5), params)
    with torch.no_grad():
        for p in params:
            p.add_(1.0)  # the raw weights move on; the average stays at the initial weights
    raw = [p.detach().clone() for p in params]
    with averaged(ema, params):
        assert all(torch.equal(p, s) for p, s in zip(params, ema.shadow_params))  # what validation sees
    assert all(torch.equal(p, r) for p, r in zip(params, raw))
    with pytest.raises(RuntimeError), averaged(ema, params):
        raise RuntimeError("validation failed")
    assert all(torch.equal(p, r) for p, r in zip(params, raw))  # restored after an error too
    with averaged(None, params):  # no --use-ema: the raw weights
        assert all(torch.equal(p, r) for p, r in zip(params, raw))


def test_ema_resume_continues_the_average_as_an_unbroken_run(tmp_path):
    import shutil

    unbroken, resumed = tmp_path / "unbroken", tmp_path / "resumed"
    run(0, unbroken, "--use-ema", "--ema-decay", "0.9", "--checkpointing-steps", "1", steps=3, lr=3e-3)
    shutil.copytree(unbroken / "checkpoints" / "checkpoint-2", resumed / "checkpoints" / "checkpoint-2")
    run(0, resumed, "--use-ema", "--ema-decay", "0.9", "--checkpointing-steps", "1",
        "--resume-from-checkpoint", "latest", steps=3, lr=3e-3)
    for name in ("ema.safetensors", "model.safetensors"):
        a = load_file(unbroken / "checkpoints" / "checkpoint-3" / name)
        b = load_file(resumed / "checkpoints" / "checkpoint-3" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_damaged_ema_file_makes_the_checkpoint_damaged(tmp_path):
    from elr_training.checkpoint import damage

    run(0, tmp_path, "--use-ema", "--checkpointing-steps", "1", steps=1)
    checkpoint = tmp_path / "checkpoints" / "checkpoint-1"
    assert damage(str(checkpoint)) is None
    (checkpoint / "ema.safetensors").write_bytes(b"\x00" * 16)
    assert damage(str(checkpoint)).startswith("ema.safetensors:")


# ------------------------------------------------------------------------------------------ stage 2


def test_stage2_validation_pairs_and_ema_of_the_adapter_subset(tmp_path, student):
    images = [edge_map(tmp_path / "a.png", seed=0), edge_map(tmp_path / "b.png", seed=3)]
    out = tmp_path / "run"
    metrics = run(2, out, "--backbone", str(student[0]), "--use-ema", "--checkpointing-steps", "2",
                  "--validation-image", *images, "--validation-prompt", "a red square", steps=2, lr=1e-3)
    pairs = np.asarray(Image.open(out / "pairs.png"))
    assert os.path.isfile(out / "samples" / "pairs-step-2.png") and os.path.isfile(out / "samples.png")
    assert pairs.shape[0] == 14 + 2 * (128 + 2) + 2  # header + two rows of 128 px (image_grid)
    ema = load_file(out / "checkpoints" / "checkpoint-2" / "ema.safetensors")
    raw = load_file(out / "checkpoints" / "checkpoint-2" / "model.safetensors")
    assert set(ema) == set(raw) and len(ema) < 1000
    assert metrics["ema"]["steps"] == 2 and metrics["trained_parameters"] == sum(v.numel() for v in ema.values())


def test_validation_pairs_fill_their_type_and_zero_the_others(tmp_path):
    from elr_training.data import load_validation_pairs

    image = edge_map(tmp_path / "a.png", size=16)  # at the training size: no resampling
    config, _ = make_config(ControlConfig, dict(max_train_steps=1, resolution=16, condition_types=["canny", "seg"],
                                                validation_image=[image], validation_prompt=["p", "q"],
                                                validation_condition_type=["canny"]))
    pairs = load_validation_pairs(config)
    assert [p["caption"] for p in pairs] == ["p", "q"] and [p["type"] for p in pairs] == ["canny", "canny"]
    conditions = pairs[0]["conditions"]
    expected = np.asarray(Image.open(image), dtype=np.float32) / 255.0
    assert conditions.shape == (4, 16, 16) and torch.equal(conditions[0], torch.from_numpy(expected))
    assert not conditions[1:].any()


# ------------------------------------------------------------------------------------------ launching


def test_more_processes_than_gpus_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    config, _ = make_config(TeacherConfig, dict(stage=0, max_train_steps=1))
    with pytest.raises(SystemExit, match="started 4 processes on this machine, which has 2 GPU"):
        train.check_launch(config, device_count=2)
    config.cpu = True  # CPU processes: any number
    train.check_launch(config, device_count=2)


def test_accelerate_launch_num_processes_without_gpus_says_what_to_do(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.path.join(REPO, "python"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
               os.path.join(REPO, "python", "train.py"), "--cpu", "--stage", "0", "--output-dir", str(tmp_path),
               "--max-train-steps", "1", *TINY]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode != 0
    assert "accelerate launch --num_processes N (N > 1) started one process" in done.stderr + done.stdout
    assert not os.path.exists(tmp_path / "metrics.json")


@pytest.mark.parametrize("name", ["stage1_sd21.yaml", "stage2_sd21.yaml"])
def test_shipped_yaml_configs_name_only_known_fields(name):
    from elr_training.config import STAGE_CONFIGS

    path = os.path.join(REPO, "python", "configs", name)
    stage = int(name[len("stage")])
    values = load_yaml(path, STAGE_CONFIGS[stage])  # unknown fields raise
    assert values["stage"] == stage
