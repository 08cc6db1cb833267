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
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(folder, "logs", "elr-diffusion")))
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


def test_stage2_control_loss_falls_and_reports_edge_nmse(tmp_path, student, capsys):
    metrics = run(2, tmp_path, "--backbone", str(student[0]), "--validation-steps", "6",
                  "--condition-types", "canny", "seg", steps=6, lr=3e-3)
    assert metrics["fixed_batch_loss_after"] < metrics["fixed_batch_loss_before"], metrics
    for key in ("validation_edge_nmse_control", "validation_edge_nmse_no_control"):
        assert metrics[key] is not None and metrics[key] >= 0
    for key in ("validation_edge_f_score_control", "validation_edge_f_score_no_control",
                "validation_seg_iou_control", "validation_seg_iou_no_control"):
        assert 0 <= metrics[key] <= 1, key
    verdict = metrics["control_verdict"]
    assert verdict.startswith("the control") and "segmentation IoU" in verdict and "edge F-score" in verdict
    assert verdict in capsys.readouterr().out
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


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_resume_gives_the_weights_of_an_unbroken_run(tmp_path, student, optimizer):
    common = (
        "--backbone",
        str(student[0]),
        "--checkpointing-steps",
        "2",
        "--synthetic-size",
        "16",
        "--gradient-accumulation-steps",
        "1",
        "--optimizer",
        optimizer,
    )
    run(2, tmp_path / "straight", *common, steps=4, lr=1e-3)
    run(2, tmp_path / "broken", *common, steps=2, lr=1e-3)
    resumed = run(2, tmp_path / "broken", *common, "--resume-from-checkpoint", "latest", steps=4, lr=1e-3)
    assert resumed["global_step"] == 4
    straight, broken = _final_weights(tmp_path / "straight"), _final_weights(tmp_path / "broken")
    assert straight.keys() == broken.keys()
    for name in straight:  # bit for bit: the optimiser state came back exactly
        torch.testing.assert_close(broken[name], straight[name], rtol=0, atol=0, msg=name)
    if optimizer == "adamw8bit":  # what came back was the 8-bit state, not a re-initialised one
        from elr_training.optim import state_tensors

        checkpoint = tmp_path / "broken" / "checkpoints" / "checkpoint-2"
        saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
        dtypes = {value.dtype for state in saved["state"].values() for value in state_tensors(state)}
        assert torch.uint8 in dtypes, dtypes
    # the data position came back too: the resumed run saw batches 3 and 4 of the epoch, not 1 and 2
    with open(tmp_path / "broken" / "checkpoints" / "checkpoint-4" / "state.json") as f:
        assert json.load(f)["batch_in_epoch"] == 4


# Not the defaults, so that a hyper-parameter the construction leaves out shows; and how they read in
# a param group (lr, betas, weight_decay, eps).
HYPER_PARAMETERS = dict(learning_rate=3e-4, adam_beta1=0.8, adam_beta2=0.95, adam_weight_decay=0.05,
                        adam_epsilon=1e-6)
IN_PARAM_GROUP = (3e-4, (0.8, 0.95), 0.05, 1e-6)


def _tiny_config(**values):
    from elr_training.config import ControlConfig, make_config

    return make_config(ControlConfig, {"max_train_steps": 1, **HYPER_PARAMETERS, **values})[0]


def _hyper_parameters(group):
    return group["lr"], group["betas"], group["weight_decay"], group["eps"]


def test_make_optimizer_adamw_is_the_old_construction():
    """--optimizer adamw builds what set_up built before the flag existed: torch's AdamW with the
    config's hyper-parameters, and its state is two fp32 moments and a step per tensor."""
    from elr_training.optim import make_optimizer, optimizer_state_bytes

    config = _tiny_config()
    params = [torch.nn.Parameter(torch.randn(64, 80)), torch.nn.Parameter(torch.randn(80))]
    made = make_optimizer(config, params)
    old = torch.optim.AdamW(params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                            weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    assert type(made) is torch.optim.AdamW
    assert len(made.param_groups) == len(old.param_groups) == 1
    group, old_group = made.param_groups[0], old.param_groups[0]
    assert group == old_group  # the same tensors and every setting (amsgrad, foreach ...) the same
    assert _hyper_parameters(group) == IN_PARAM_GROUP
    assert optimizer_state_bytes(made) == 0  # no state before the first step
    sum(p.square().sum() for p in params).backward()
    made.step()
    assert optimizer_state_bytes(made) == sum(8 * p.numel() + 4 for p in params)  # exp_avg, exp_avg_sq, step


def test_make_optimizer_adamw8bit_takes_the_same_hyper_parameters():
    import bitsandbytes

    from elr_training.optim import make_optimizer

    config = _tiny_config(optimizer="adamw8bit")
    made = make_optimizer(config, [torch.nn.Parameter(torch.randn(64, 80))])
    assert type(made) is bitsandbytes.optim.AdamW8bit
    assert _hyper_parameters(made.param_groups[0]) == IN_PARAM_GROUP
    assert (made.args.optim_bits, made.args.min_8bit_size) == (8, 4096)


def test_optimizer_adamw8bit_without_bitsandbytes_says_what_to_install(monkeypatch):
    from elr_training.optim import make_optimizer

    config = _tiny_config(optimizer="adamw8bit")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # None in sys.modules: the import fails
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
    expected = r"--optimizer adamw8bit needs bitsandbytes.*pip install bitsandbytes"
    with pytest.raises(ImportError, match=expected):
        make_optimizer(config, [torch.nn.Parameter(torch.randn(4))])


def test_optimizer_flag_rejects_an_unknown_name():
    from elr_training.config import parse_config

    with pytest.raises(ValueError, match=r"^--optimizer must be one of \['adamw', 'adamw8bit'\], got 'sgd'$"):
        parse_config(["--stage", "2", "--optimizer", "sgd"])
    from elr_training.optim import make_optimizer

    config = _tiny_config()
    config.optimizer = "sgd"  # past validation, make_optimizer still names the flag
    with pytest.raises(ValueError, match=r"^--optimizer must be one of"):
        make_optimizer(config, [torch.nn.Parameter(torch.randn(4))])


def _expected_adamw8bit_bytes(params):
    """What bitsandbytes' AdamW8bit allocates (its defaults: 256-value blocks, min_8bit_size 4096): per
    tensor of n >= 4096 values two uint8 moments (2n) and two fp32 absmax per block; under 4096 two
    fp32 moments (8n); and once, the two 256-value fp32 qmaps that every 8-bit tensor shares."""
    large = [p.numel() for p in params if p.numel() >= 4096]
    small = [p.numel() for p in params if p.numel() < 4096]
    quantised = sum(2 * n + 2 * 4 * math.ceil(n / 256) for n in large)
    return quantised, quantised + 8 * sum(small) + (2 * 256 * 4 if large else 0)


def test_optimizer_adamw8bit_trains_stage2_in_about_2_bytes_per_parameter(tmp_path, student, monkeypatch):
    from elr_training.optim import make_optimizer, optimizer_state_bytes

    built = {}

    def keep(config, params):  # the optimiser set_up builds, and the trained weights before step 1
        built["initial"] = [p.detach().clone() for p in params]
        built["optimizer"] = make_optimizer(config, params)
        return built["optimizer"]

    monkeypatch.setattr(train, "make_optimizer", keep)
    metrics = run(2, tmp_path, "--backbone", str(student[0]), "--optimizer", "adamw8bit", steps=4, lr=3e-3)
    assert math.isfinite(metrics["fixed_batch_loss_after"]), metrics
    assert all(math.isfinite(loss) for _, loss in metrics["loss_history"]["train/loss"])

    optimizer = built["optimizer"]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    changed = [not torch.equal(p.detach(), before) for p, before in zip(params, built["initial"])]
    assert all(changed), f"{sum(changed)} of {len(params)} trained tensors changed"
    large = [p for p in params if p.numel() >= 4096]
    assert large, [tuple(p.shape) for p in params]
    for p in large:  # the moments of the large tensors are 8-bit, in the parameter's shape
        state = optimizer.state[p]
        for key in ("state1", "state2"):
            assert (state[key].dtype, state[key].shape) == (torch.uint8, p.shape), key
    quantised, expected = _expected_adamw8bit_bytes(params)
    assert optimizer_state_bytes(optimizer) == expected
    per_value = quantised / sum(p.numel() for p in large)
    assert 2.0 < per_value <= 2.04, per_value  # 2 bytes plus 8 bytes of absmax per 256 values


def test_damaged_latest_checkpoint_resumes_from_the_one_before_saying_so(tmp_path, student, capsys):
    from elr_training.checkpoint import CheckpointError, find_checkpoint

    common = ("--backbone", str(student[0]), "--checkpointing-steps", "2", "--synthetic-size", "16")
    run(2, tmp_path / "straight", *common, steps=4, lr=1e-3)
    run(2, tmp_path / "broken", *common, steps=4, lr=1e-3)
    checkpoints = tmp_path / "broken" / "checkpoints"
    (checkpoints / "checkpoint-4" / "model.safetensors").write_bytes(os.urandom(100))
    # an explicit damaged checkpoint: an error naming the file and the complete one before it
    with pytest.raises(CheckpointError, match=r"checkpoint-4: damaged, model\.safetensors: .*checkpoint-2"):
        find_checkpoint(str(checkpoints / "checkpoint-4"), str(checkpoints))
    capsys.readouterr()
    resumed = run(2, tmp_path / "broken", *common, "--resume-from-checkpoint", "latest", steps=4, lr=1e-3)
    out = capsys.readouterr().out
    assert "checkpoint-4 is damaged (model.safetensors:" in out and "resumed from" in out and "checkpoint-2" in out
    assert resumed["global_step"] == 4
    straight, broken = _final_weights(tmp_path / "straight"), _final_weights(tmp_path / "broken")
    for name in straight:  # steps 3 and 4 trained again from checkpoint-2: the unbroken run's weights
        torch.testing.assert_close(broken[name], straight[name], rtol=0, atol=1e-6, msg=name)
    (checkpoints / "checkpoint-2" / "optimizer.pt").write_bytes(b"truncated")
    (checkpoints / "checkpoint-4" / "model.safetensors").write_bytes(os.urandom(100))
    with pytest.raises(CheckpointError, match="every checkpoint .* is damaged"):
        find_checkpoint("latest", str(checkpoints), say=lambda _: None)


def test_errors_print_as_one_line_unless_debug(tmp_path):
    script = os.path.join(REPO, "python", "train.py")
    env = {**os.environ, "PYTHONPATH": REPO}
    env.pop("ELR_DEBUG", None)
    missing = str(tmp_path / "no-such-folder")
    argv = [sys.executable, script, "--stage", "2", "--data", missing, "--output-dir", str(tmp_path / "r")]
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"train.py: error: --data {missing}: no such file or folder (--debug or ELR_DEBUG=1 for the traceback)"
    )
    assert "Traceback" not in done.stderr
    debug = subprocess.run(argv + ["--debug"], env=env, capture_output=True, text=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "FileNotFoundError" in debug.stderr


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


# Values of metrics.json that are clocks or paths, not results: the reproducibility test skips them.
NOT_RESULTS = {"wall_time_s", "s_per_it_median", "wall_time_all_stages_s", "model_dir", "output_dir", "backbone",
               "teacher"}


def _results(value):
    if isinstance(value, dict):
        return {k: _results(v) for k, v in value.items() if k not in NOT_RESULTS}
    if isinstance(value, list):
        return [_results(v) for v in value]
    return value


def test_the_default_chain_gives_the_same_numbers_twice(tmp_path):
    """Stages 0, 1 and 2 in a row, twice, each in a fresh process: metrics.json and every saved weight
    bit for bit (torch's thread count left to the machine: the preset fixes it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = REPO
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        subprocess.run(
            [sys.executable, os.path.join(REPO, "python", "train.py"), "--stage", "2", "--output-dir", str(out),
             "--max-train-steps", "3", "--earlier-stage-steps", "3", "3", "--validation-steps", "3", *TINY],
            check=True, env=env, capture_output=True, text=True,
        )
        runs.append(out)
    a, b = (read_metrics(out) for out in runs)
    assert a["environment"]["torch_threads"] == 2 and a["environment"]["deterministic_algorithms"]
    assert a["control_verdict"] == b["control_verdict"] and "edge NMSE" in a["control_verdict"]
    assert _results(a) == _results(b)
    files = sorted(p.relative_to(runs[0]) for p in runs[0].rglob("*.safetensors"))
    assert any("stage0" in str(f) for f in files) and any("adapter" in str(f) for f in files)
    for f in files:
        left, right = load_file(runs[0] / f), load_file(runs[1] / f)
        assert left.keys() == right.keys(), f
        for key in left:
            assert torch.equal(left[key], right[key]), (f, key)


def test_control_verdict_in_words():
    from elr_training.metrics import control_verdict

    helped = control_verdict({"validation_edge_nmse_control": 1.0, "validation_edge_nmse_no_control": 2.0,
                              "validation_edge_f_score_control": 0.5, "validation_edge_f_score_no_control": 0.25})
    assert helped == ("the control helped: edge NMSE 1.000 with control vs 2.000 without (50% lower, better); "
                      "edge F-score 0.500 with control vs 0.250 without (100% higher, better)")
    mixed = control_verdict({"val/edge_nmse_control": 2.5, "val/edge_nmse_no_control": 2.0,
                             "val/seg_iou_control": 0.5, "val/seg_iou_no_control": 0.3})
    assert mixed.startswith("the control helped on some metrics only: edge NMSE 2.500") and "(25% higher, worse)" in mixed
    assert control_verdict({"val/edge_nmse_control": 3.0, "val/edge_nmse_no_control": 2.0}).startswith(
        "the control did not help")
    assert control_verdict({}) == "no control metric was measured"


def test_num_threads_and_deterministic_apply_for_the_run_only(tmp_path):
    from elr_training.config import ControlConfig, make_config

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    config, _ = make_config(ControlConfig, dict(stage=2, num_threads=1, deterministic=True, max_train_steps=1))
    with train.reproducible(config):
        assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, deterministic)
    with pytest.raises(ValueError, match="--num-threads must be >= 0"):
        make_config(ControlConfig, dict(stage=2, num_threads=-1, max_train_steps=1))


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
