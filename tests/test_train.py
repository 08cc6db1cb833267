"""python/train.py end to end on the tiny configuration at 16 x 16 pixels (seconds per stage).

The stage-0 teacher and the stage-1 student are trained once per module and reused: stage 1 needs a
teacher, stage 2 a backbone, as in real use.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "python"))

import train  # noqa: E402  (python/train.py)

# Small and quick: 16-px images, batches of 4, two sampling steps at validation.
TINY = [
    "--resolution",
    "16",
    "--train-batch-size",
    "4",
    "--num-validation-images",
    "2",
    "--num-inference-steps",
    "2",
    "--validation-steps",
    "1000",
    "--checkpointing-steps",
    "1000",
    "--synthetic-size",
    "4",
]


def run(stage, output_dir, *extra, steps=6, lr=None):
    argv = [
        "--stage",
        str(stage),
        "--output-dir",
        str(output_dir),
        "--max-train-steps",
        str(steps),
        *TINY,
        *extra,
    ]
    if lr is not None:
        argv += ["--learning-rate", str(lr)]
    return train.main(argv)


def read_metrics(folder):
    with open(os.path.join(folder, "metrics.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stage0")
    metrics = run(0, folder, steps=8, lr=3e-3)
    return folder, metrics


@pytest.fixture(scope="module")
def student(tmp_path_factory, teacher):
    folder = tmp_path_factory.mktemp("stage1")
    metrics = run(1, folder, "--teacher", str(teacher[0]), "--rank-ratio", "0.25", steps=10, lr=1e-3)
    return folder, metrics


def test_stage0_teacher_loss_falls_and_run_folder(teacher):
    folder, metrics = teacher
    # synthetic_size == batch size: every step sees the same 4 scenes, the fixed batch of the test
    assert metrics["fixed_batch_loss_after"] < 0.8 * metrics["fixed_batch_loss_before"], metrics
    for name in (
        "samples.png",
        "loss_curves.png",
        "metrics.json",
        "model/unet/config.json",
        "model/text_encoder/config.json",
        "model/tokenizer/tokenizer_config.json",
        "model/scheduler/scheduler_config.json",
    ):
        assert os.path.isfile(os.path.join(folder, name)), name
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(folder, "logs")))
    assert os.listdir(os.path.join(folder, "checkpoints")) == ["checkpoint-8"]  # saved at the end
    assert read_metrics(folder)["global_step"] == 8


def test_stage1_distillation_loss_falls_and_saves_decomposed_student(student, teacher):
    folder, metrics = student
    assert metrics["fixed_batch_loss_after"] < 0.9 * metrics["fixed_batch_loss_before"], metrics
    assert metrics["decomposition"]["params_after"] < metrics["decomposition"]["params_before"]
    assert os.path.isfile(os.path.join(folder, "model", "unet", "elr_decompose.json"))
    # the saved student loads back as a low-rank UNet with the trained weights
    from elr_training.models import load_components

    loaded = load_components(str(folder), "--backbone").unet
    assert sum(p.numel() for p in loaded.parameters()) == metrics["decomposition"]["params_after"]


def test_stage1_feature_distillation_and_min_snr(tmp_path, teacher):
    metrics = run(
        1,
        tmp_path,
        "--teacher",
        str(teacher[0]),
        "--feature-distillation",
        "down=0.1,mid=0.2,up=0.1/0/0.3",
        "--loss-weighting",
        "min-snr",
        "--task-loss-weight",
        "0.1",
        steps=3,
        lr=3e-3,
    )
    history = metrics["loss_history"]
    assert {"train/loss", "train/loss_kd", "train/loss_feature", "train/loss_task"} <= set(history)
    assert all(v > 0 for _, v in history["train/loss_feature"])
    # Table 1's "decomposed U-Net w/o distillation": the plain diffusion loss alone
    plain = run(
        1,
        tmp_path / "plain",
        "--teacher",
        str(teacher[0]),
        "--kd-weight",
        "0",
        "--task-loss-weight",
        "1",
        steps=2,
        lr=1e-3,
    )
    assert all(
        a == b
        for (_, a), (_, b) in zip(
            plain["loss_history"]["train/loss"], plain["loss_history"]["train/loss_task"]
        )
    )


def test_stage2_control_loss_falls_and_reports_edge_nmse(tmp_path, student):
    metrics = run(2, tmp_path, "--backbone", str(student[0]), "--validation-steps", "6", steps=6, lr=3e-3)
    assert metrics["fixed_batch_loss_after"] < metrics["fixed_batch_loss_before"], metrics
    for key in ("validation_edge_nmse_control", "validation_edge_nmse_no_control"):
        assert metrics[key] is not None and metrics[key] >= 0
    assert metrics["adapter_parameters"]["trainable"] < metrics["adapter_parameters"]["total"]
    assert os.path.isfile(os.path.join(tmp_path, "model", "adapter", "config.json"))
    assert os.path.isfile(os.path.join(tmp_path, "samples", "step-6.png"))


def test_stage2_kron_factor_picks_the_split(tmp_path, student):
    """--kron-factor: the default is eq. 9 (A of terms x terms), -1 LoKr's balanced split; the saved
    adapter records it and its factors have those shapes."""
    import json

    shapes = {}
    for name, extra in (("eq9", ()), ("lokr", ("--kron-factor", "-1"))):
        out = tmp_path / name
        run(2, out, "--backbone", str(student[0]), "--validation-steps", "0", *extra, steps=1, lr=1e-3)
        with open(os.path.join(out, "model", "adapter", "config.json")) as f:
            shapes[name] = json.load(f)["factor"]
        weights = load_file(os.path.join(out, "model", "adapter", "diffusion_pytorch_model.safetensors"))
        shapes[name + "_A"] = {tuple(v.shape) for k, v in weights.items() if k.endswith(".A")}
    assert shapes["eq9"] is None and shapes["lokr"] == -1
    assert (4, 4, 4) in shapes["eq9_A"] and all(a[0] == 4 for a in shapes["eq9_A"]), shapes["eq9_A"]
    assert shapes["lokr_A"] != shapes["eq9_A"], shapes["lokr_A"]


def _final_weights(folder):
    checkpoints = os.path.join(folder, "checkpoints")
    last = sorted(os.listdir(checkpoints), key=lambda n: int(n.split("-")[1]))[-1]
    return load_file(os.path.join(checkpoints, last, "model.safetensors"))


def test_resume_gives_the_weights_of_an_unbroken_run(tmp_path, student):
    common = (
        "--backbone",
        str(student[0]),
        "--checkpointing-steps",
        "2",
        "--synthetic-size",
        "16",
        "--gradient-accumulation-steps",
        "1",
    )
    run(2, tmp_path / "straight", *common, steps=4, lr=1e-3)
    run(2, tmp_path / "broken", *common, steps=2, lr=1e-3)
    resumed = run(2, tmp_path / "broken", *common, "--resume-from-checkpoint", "latest", steps=4, lr=1e-3)
    assert resumed["global_step"] == 4
    straight, broken = _final_weights(tmp_path / "straight"), _final_weights(tmp_path / "broken")
    assert straight.keys() == broken.keys()
    for name in straight:
        torch.testing.assert_close(broken[name], straight[name], rtol=0, atol=1e-6, msg=name)
    # the data position came back too: the resumed run saw batches 3 and 4 of the epoch, not 1 and 2
    with open(tmp_path / "broken" / "checkpoints" / "checkpoint-4" / "state.json") as f:
        assert json.load(f)["batch_in_epoch"] == 4


def test_checkpoint_is_atomic(tmp_path):
    """A .tmp folder left by a crash is neither resumed from nor kept."""
    from elr_training.checkpoint import find_checkpoint, list_checkpoints

    folder = tmp_path / "checkpoints"
    (folder / "checkpoint-99.tmp").mkdir(parents=True)
    assert find_checkpoint("latest", str(folder)) is None
    run(0, tmp_path, "--checkpointing-steps", "1", steps=1, lr=1e-3)
    assert [os.path.basename(p) for p in list_checkpoints(str(folder))] == ["checkpoint-1"]
    assert not (folder / "checkpoint-99.tmp").exists()


def test_stage2_alone_runs_stages_0_and_1_first(tmp_path, capsys):
    metrics = run(2, tmp_path, "--earlier-stage-steps", "2", "2", "--validation-steps", "2", steps=2, lr=1e-3)
    assert "training the tiny teacher (stage 0)" in capsys.readouterr().out
    top = read_metrics(tmp_path)
    for stage, unet_file in (("stage0", "config.json"), ("stage1", "elr_decompose.json")):
        assert os.path.isfile(tmp_path / stage / "model" / "unet" / unet_file)
        assert top["earlier_stages"][stage]["global_step"] == 2
    assert set(top["earlier_stages"]) == {"stage0", "stage1"} and "wall_time_all_stages_s" in top
    assert metrics["config"]["backbone"] == str(tmp_path / "stage1")
    assert os.path.isfile(tmp_path / "loss_curves.png") and os.path.isfile(tmp_path / "samples.png")


def test_accelerate_launch_two_cpu_processes_agree(tmp_path, student):
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    # accelerate 1.x starts a single process for `launch --cpu` unless MPI is set up; torchrun's launcher
    # (--multi_gpu) with the script's own --cpu gives DDP over gloo on CPU processes.
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
        os.path.join(REPO, "python", "train.py"),
        "--cpu",
        "--stage",
        "2",
        "--backbone",
        str(student[0]),
        "--output-dir",
        str(tmp_path),
        "--max-train-steps",
        "2",
        "--learning-rate",
        "1e-3",
        "--synthetic-size",
        "16",
        *TINY[:-2],
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = read_metrics(tmp_path)
    checksums = metrics["weights_checksum_per_process"]
    assert len(checksums) == 2 and checksums[0] == checksums[1], checksums
    assert metrics["config"]["stage"] == 2 and metrics["global_step"] == 2


@pytest.fixture(scope="module")
def sd_like_folder(tmp_path_factory):
    """A Stable-Diffusion-2.1-like folder written with save_pretrained: latent UNet, AutoencoderKL, CLIP
    text model, a tokenizer built locally, and a v-prediction DDIM scheduler as SD 2.1 has."""
    from diffusers import DDIMScheduler

    from elr_ext import tiny

    folder = tmp_path_factory.mktemp("sd21-like")
    torch.manual_seed(0)
    tiny.tiny_unet(in_channels=4, out_channels=4, sample_size=8).save_pretrained(folder / "unet")
    tiny.tiny_vae().save_pretrained(folder / "vae")
    tiny.tiny_text_encoder().save_pretrained(folder / "text_encoder")
    tiny.tiny_tokenizer().save_pretrained(folder / "tokenizer")
    DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        clip_sample=False,
    ).save_pretrained(folder / "scheduler")
    return folder


def test_pretrained_folder_trains_stage1_then_stage2(tmp_path, sd_like_folder):
    stage1 = run(
        1, tmp_path / "s1", "--pretrained", str(sd_like_folder), "--preset", "tiny", steps=2, lr=1e-3
    )
    assert stage1["global_step"] == 2 and stage1["config"]["pretrained"] == str(sd_like_folder)
    assert os.path.isdir(tmp_path / "s1" / "model" / "vae")
    stage2 = run(
        2,
        tmp_path / "s2",
        "--pretrained",
        str(sd_like_folder),
        "--backbone",
        str(tmp_path / "s1"),
        "--preset",
        "tiny",
        "--validation-steps",
        "2",
        steps=2,
        lr=1e-3,
    )
    assert stage2["global_step"] == 2 and stage2["validation_edge_nmse_control"] is not None
    # the dense pretrained UNet as the backbone (no --backbone)
    dense = run(
        2, tmp_path / "s2dense", "--pretrained", str(sd_like_folder), "--preset", "tiny", steps=2, lr=1e-3
    )
    assert dense["global_step"] == 2


def test_pretrained_folder_missing_part_names_the_file(tmp_path, sd_like_folder):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(sd_like_folder, broken)
    os.remove(broken / "vae" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"vae/diffusion_pytorch_model\.safetensors"):
        run(1, tmp_path / "out", "--pretrained", str(broken), "--preset", "tiny", steps=1)
    with pytest.raises(SystemExit, match="stage 0 trains the tiny"):
        run(0, tmp_path / "out0", "--pretrained", str(sd_like_folder), "--preset", "tiny", steps=1)


def test_config_precedence_yaml_and_cli(tmp_path):
    from elr_training.config import parse_config

    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("learning_rate: 0.0005\nresolution: 24\ncondition_types: [canny, seg]\n")
    config, sources = parse_config(["--stage", "2", "--config", str(yaml_file), "--resolution", "16"])
    assert (config.learning_rate, sources["learning_rate"]) == (0.0005, "yaml")
    assert (config.resolution, sources["resolution"]) == (16, "cli")
    assert config.condition_types == ["canny", "seg"]
    assert sources["max_train_steps"] == "preset tiny"
    paper, _ = parse_config(["--stage", "2", "--pretrained", str(tmp_path)])
    assert (paper.learning_rate, paper.resolution, paper.num_train_epochs, paper.max_train_steps) == (
        1e-5,
        512,
        1,
        None,
    )
    yaml_file.write_text("learning_rat: 1\n")
    with pytest.raises(ValueError, match="unknown field.*learning_rat"):
        parse_config(["--stage", "2", "--config", str(yaml_file)])
    with pytest.raises(ValueError, match="one rank policy"):
        parse_config(["--stage", "1", "--rank", "4", "--energy", "0.9"])


def test_bf16_autocast_trains_stages_1_and_2(tmp_path, teacher):
    """--mixed-precision bf16 (CPU autocast, frozen models in bf16): the student's low-rank attention
    and the adapter's Kronecker and FDN ops take the autocast rule of the op they replace."""
    from accelerate.state import AcceleratorState

    # accelerate keeps one state per process: the other tests' runs fixed mixed_precision="no"
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        _bf16_stages(tmp_path, teacher)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def _bf16_stages(tmp_path, teacher):
    student = tmp_path / "stage1"
    metrics = run(1, student, "--teacher", str(teacher[0]), "--rank-ratio", "0.25", "--mixed-precision", "bf16",
                  steps=4, lr=1e-3)
    assert math.isfinite(metrics["fixed_batch_loss_after"]), metrics
    metrics = run(2, tmp_path / "stage2", "--backbone", str(student), "--mixed-precision", "bf16", steps=4, lr=3e-3)
    assert math.isfinite(metrics["fixed_batch_loss_after"]), metrics
    assert os.path.isfile(os.path.join(tmp_path, "stage2", "model", "adapter", "config.json"))


def test_stage2_gradient_checkpointing_trains(tmp_path, student):
    """--gradient-checkpointing checkpoints the frozen UNet and the adapter's copied blocks."""
    metrics = run(2, tmp_path, "--backbone", str(student[0]), "--gradient-checkpointing", steps=4, lr=3e-3)
    assert metrics["fixed_batch_loss_after"] < metrics["fixed_batch_loss_before"], metrics
