"""train.py --plan and elr_ext.plan: one step on tensors without data.

Every plan runs in its own process (see python/train.py end_after_plan). The checks are exact
contracts the plan must meet whatever the card: weights, gradients and optimiser state are what the
models and the optimiser hold, byte for byte; the split adds up to the peak; bad input names what is
wrong. How close the peak comes to a measured one is a benchmark (benchmarks/train_step.py --simulate).
"""

import json
import math
import os
import sys

import pytest

from elr_ext.plan import run_plan_process

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, "python", "train.py")
MIB = 2 ** 20


def run(args, tmp_path, expect=0):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = run_plan_process([sys.executable, TRAIN, "--plan", "--output-dir", str(tmp_path), *args], env=env,
                            capture_output=True, text=True, timeout=600)
    assert done.returncode == expect, done.stderr[-3000:]
    return done


def plan_of(tmp_path):
    with open(os.path.join(tmp_path, "plan.json")) as f:
        return json.load(f)


def adamw_state_bytes(numels):
    return sum(8 * n + 4 for n in numels)  # exp_avg, exp_avg_sq fp32 and a 0-dim fp32 step per tensor


def adamw8bit_state_bytes(numels):
    total = 2048  # bitsandbytes' two 256-value fp32 code books, shared by every 8-bit tensor
    for n in numels:
        total += 2 * n + 8 * math.ceil(n / 256) if n >= 4096 else 8 * n
    return total


def trained_numels(stage_args):
    """The trained tensors' sizes of the tiny stage, from a real (not planned) build."""
    sys.path.insert(0, os.path.join(REPO, "python"))
    import torch

    from elr_training.config import parse_config
    from elr_training.models import tiny_components
    from elr_training.stages import STAGES

    config, _ = parse_config(stage_args)
    stage = STAGES[config.stage](config, tiny_components(config.seed), torch.device("cpu"), lambda *a: None)
    named = dict(stage.trained_module().named_parameters())
    return [named[n].numel() for n in stage.trained_names()]


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_tiny_stage2_plan_counts_the_optimiser_state_exactly(tmp_path, optimizer):
    done = run(["--stage", "2", "--plan-device", "cpu", "--optimizer", optimizer], tmp_path)
    assert "peak memory" in done.stdout and "optimizer state" in done.stdout
    plan = plan_of(tmp_path)["plan"]
    numels = trained_numels(["--stage", "2"])
    assert plan["trainable_params"] == sum(numels)
    expected = adamw_state_bytes(numels) if optimizer == "adamw" else adamw8bit_state_bytes(numels)
    assert plan["peak"]["split"]["optimizer state"] == expected
    assert sum(plan["peak"]["split"].values()) == plan["peak"]["total"] == plan["peak_bytes"]
    assert plan["peak"]["split"]["activations"] > 0 and plan["flops"] > 0


def test_tiny_plan_for_a_card_estimates_time_and_fit(tmp_path):
    done = run(["--stage", "2", "--plan-device", "h100-80gb", "--mixed-precision", "bf16"], tmp_path)
    plan = plan_of(tmp_path)["plan"]
    assert plan["device"] == "h100-80gb" and plan["fits"] is True and plan["seconds"] > 0
    assert "roofline time" in done.stdout and "fits on h100-80gb" in done.stdout
    # the CUDA allocator's 512-byte blocks: every kind of memory is a multiple of them
    assert all(v % 512 == 0 for v in plan["peak"]["split"].values())


def test_stage1_plan_at_sd21_shapes(tmp_path):
    """SD 2.1's UNet, text encoder and VAE at 256 px, batch 1: the student is the decomposed teacher
    (rank 1/3), trained in fp32 with AdamW. Weights are every model's parameters and buffers, fp32."""
    run(["--stage", "1", "--architecture", "sd21", "--preset", "paper", "--resolution", "256", "--train-batch-size", "1",
         "--max-train-steps", "1", "--plan-device", "v100-32gb"], tmp_path)
    result = plan_of(tmp_path)
    plan = result["plan"]
    assert plan["total_params"] > 865_910_724  # the teacher UNet alone (elr_ext.architectures, exact)
    assert plan["peak"]["split"]["optimizer state"] >= 8 * plan["trainable_params"]
    assert plan["peak"]["split"]["weights"] >= 4 * plan["total_params"]
    assert plan["peak"]["split"]["weights"] < 4 * plan["total_params"] + 64 * MIB  # + buffers and block rounding
    assert plan["seconds_to_plan"] < 300


def test_unknown_plan_device_lists_the_known_cards(tmp_path):
    done = run(["--stage", "2", "--plan-device", "gtx480"], tmp_path, expect=2)
    assert "--plan-device 'gtx480'" in done.stderr and "h100-80gb" in done.stderr and "v100-32gb" in done.stderr
    assert not os.path.exists(os.path.join(tmp_path, "plan.json"))


def test_pretrained_folder_without_a_config_names_the_file(tmp_path):
    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    done = run(["--stage", "1", "--pretrained", str(folder), "--max-train-steps", "1"], tmp_path / "out", expect=2)
    assert os.path.join(str(folder), "unet", "config.json") in done.stderr


def test_a_rank_policy_the_plan_cannot_know_is_refused_with_advice(tmp_path):
    """The tiny preset's stage 1 keeps 90 % of each layer's spectral energy: the ranks depend on the
    singular values, which a plan does not have. Refused before anything is built, naming the flag;
    a fixed rank plans."""
    for args, flag in ((["--stage", "1", "--max-train-steps", "1"], "--energy 0.9"),
                       (["--stage", "1", "--param-budget", "0.5"], "--param-budget 0.5")):
        done = run(args, tmp_path, expect=2)
        assert f"--plan cannot plan stage 1 with {flag}" in done.stderr and "--rank-ratio" in done.stderr
        assert not os.path.exists(os.path.join(tmp_path, "plan.json"))
    run(["--stage", "1", "--max-train-steps", "1", "--rank-ratio", "0.33"], tmp_path)  # replaces the preset's energy
    assert plan_of(tmp_path)["plan"]["trainable_params"] > 0


def test_a_value_the_plan_cannot_know_names_where_it_is_needed(tmp_path):
    """A step that branches on a tensor's value: the error names the line instead of a wrong number."""
    code = """
import torch, elr_ext.plan as plan
def build():
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    def loss():
        y = lin(x)
        if y.sum() > 0:  # the branch a plan cannot take
            y = y * 2
        return y.sum()
    return plan.PlannedStep({"lin": lin}, loss, torch.optim.SGD(lin.parameters(), lr=1.0))
try:
    plan.plan_step(build, device="cpu")
except plan.PlanError as e:
    print("PLANERROR", e)
"""
    script = tmp_path / "branching_step.py"  # a file, so that the error can quote the line
    script.write_text(code)
    done = run_plan_process([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=REPO))
    assert "PLANERROR" in done.stdout and "branching_step.py:8: if y.sum() > 0" in done.stdout, \
        done.stdout + done.stderr[-2000:]


def test_an_op_without_a_fake_kernel_is_named(tmp_path):
    code = """
import torch, elr_ext.plan as plan
@torch.library.custom_op("plan_test::opaque", mutates_args=())
def opaque(x: torch.Tensor) -> torch.Tensor:
    return x.clone()
def build():
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    return plan.PlannedStep({"lin": lin}, lambda: opaque(lin(x)).sum(), torch.optim.SGD(lin.parameters(), lr=1.0))
try:
    plan.plan_step(build, device="cpu")
except plan.PlanError as e:
    print("PLANERROR", e)
"""
    done = run_plan_process([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=REPO))
    assert "PLANERROR" in done.stdout and "plan_test.opaque" in done.stdout, done.stdout + done.stderr[-2000:]


def test_weights_converted_in_the_build_are_counted_once(tmp_path):
    """A frozen model cast to bf16 while the step is built holds bf16 weights only: the fp32 tensors it
    had before are gone (with the garbage collector off, so nothing but reference counts frees them)."""
    code = """
import gc, json, torch, elr_ext.plan as plan
gc.disable()
def build():
    frozen = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 1024))
    frozen.to("cpu").to(torch.bfloat16).requires_grad_(False)
    head = torch.nn.Linear(1024, 1)
    x = torch.randn(4, 1024, dtype=torch.bfloat16)
    return plan.PlannedStep({"frozen": frozen, "head": head}, lambda: head(frozen(x).float()).sum(),
                            torch.optim.SGD(head.parameters(), lr=1.0))
p = plan.plan_step(build, device="a100-80gb")
print("SPLIT", json.dumps(p.to_dict()["peak"]["split"]))
"""
    done = run_plan_process([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=REPO))
    split = json.loads(done.stdout.split("SPLIT", 1)[1].splitlines()[0])
    block = 512  # the CUDA allocator's rounding, per tensor
    frozen = 2 * (math.ceil(1024 * 1024 * 2 / block) + math.ceil(1024 * 2 / block)) * block
    head = (math.ceil(1024 * 4 / block) + 1) * block
    assert split["weights"] == frozen + head, split
    assert split["inputs"] <= 4 * 1024 * 2 + block, split


def test_tiny_sdxl_stage2_plan(tmp_path):
    """The SDXL-shaped tiny variant: two text encoders, pooled text and time ids into the UNet and the
    adapter, planned as training runs it."""
    done = run(["--stage", "2", "--architecture", "tiny-sdxl", "--plan-device", "rtx4090-24gb",
                "--mixed-precision", "bf16", "--optimizer", "adamw8bit"], tmp_path)
    plan = plan_of(tmp_path)["plan"]
    assert plan["fits"] is True and plan["flops"] > 0 and "peak memory" in done.stdout
    assert plan["peak"]["split"]["inputs"] < MIB


def test_a_cached_run_plans_without_the_encoders_on_the_device(tmp_path):
    """--cache-latents: the plan is the cached run's. Its weights are the uncached plan's less exactly
    the text encoders' and the VAE encoder's bytes (from a real build of the same components); the
    optimiser state is the same; the batch is what the cache stores. No cache folder is made."""
    sys.path.insert(0, os.path.join(REPO, "python"))
    from elr_training.config import parse_config
    from elr_training.data.cache import module_bytes, vae_encoder_modules
    from elr_training.plan import planned_components

    args = ["--stage", "2", "--architecture", "tiny-sdxl", "--plan-device", "cpu"]
    cache = tmp_path / "cache"
    run(args, tmp_path / "plain")
    done = run(args + ["--cache-latents", str(cache)], tmp_path / "cached")
    plain, cached = plan_of(tmp_path / "plain")["plan"], plan_of(tmp_path / "cached")["plan"]
    config, _ = parse_config(args + ["--plan", "--cache-latents", str(cache)])
    components = planned_components(config)
    encoders = module_bytes(components.text_encoders) + module_bytes(vae_encoder_modules(components.vae))
    assert encoders > 0
    assert plain["peak"]["split"]["weights"] - cached["peak"]["split"]["weights"] == encoders
    assert cached["peak"]["split"]["optimizer state"] == plain["peak"]["split"]["optimizer state"]
    assert cached["trainable_params"] == plain["trainable_params"]
    # the cached batch holds the text encodings (states and pooled, and the empty caption's) besides the latents
    assert cached["peak"]["split"]["inputs"] > plain["peak"]["split"]["inputs"]
    assert "from the latent cache" in done.stdout and not cache.exists()


def test_train_py_retries_a_plan_process_that_dies_inside_torch(monkeypatch, capsys):
    """train.py --plan runs the plan in a child process: a child killed by SIGABRT / SIGSEGV is run
    again (up to elr_ext.plan.PLAN_TRIES), any other status is the script's."""
    import signal
    import subprocess as sp

    sys.path.insert(0, os.path.join(REPO, "python"))
    import train

    for statuses, expected_exit, expected_runs in (([-signal.SIGABRT, -signal.SIGSEGV, 0], 0, 3),
                                                   ([2], 2, 1), ([-signal.SIGSEGV] * 3, 1, 3)):
        calls = []

        def fake_run(cmd, env=None, statuses=statuses, calls=calls):
            calls.append(env.get(train.PLAN_CHILD))
            return sp.CompletedProcess(cmd, statuses[len(calls) - 1])

        monkeypatch.setattr(sp, "run", fake_run)
        with pytest.raises(SystemExit) as done:
            train.plan_in_child(["--stage", "2", "--plan"])
        assert done.value.code == expected_exit and len(calls) == expected_runs and set(calls) == {"1"}
    assert "died inside torch (SIGSEGV, try 3 of 3" in capsys.readouterr().err


def test_run_plan_process_runs_again_only_after_torchs_crash_signals(tmp_path):
    """A real child that dies by SIGABRT, then SIGSEGV, then exits 0 is run three times; an exit status
    or SIGKILL (the OOM killer's) ends it at once; the last run's output is what comes back."""
    import signal

    from elr_ext.plan import PLAN_TRIES, crash_signal

    counter = tmp_path / "runs"
    code = """
import os, signal, sys
path, deaths = sys.argv[1], sys.argv[2].split(",")
n = int(open(path).read()) if os.path.exists(path) else 0
open(path, "w").write(str(n + 1))
print("run", n + 1, flush=True)
if n < len(deaths) and deaths[n]:
    os.kill(os.getpid(), getattr(signal, deaths[n]))
sys.exit(0 if n >= len(deaths) else 7)
"""
    crashes = []
    for deaths, expected_code, expected_runs in (("SIGABRT,SIGSEGV", 0, 3), ("SIGABRT,SIGABRT,SIGSEGV", -11, 3),
                                                 ("SIGKILL", -9, 1), (",", 7, 1)):
        counter.unlink(missing_ok=True)
        done = run_plan_process([sys.executable, "-c", code, str(counter), deaths], capture_output=True, text=True,
                                timeout=60, on_crash=lambda *a: crashes.append(a))
        assert done.returncode == expected_code and int(counter.read_text()) == expected_runs, (deaths, done)
        assert done.stdout.strip() == f"run {expected_runs}"
    assert PLAN_TRIES == 3 and crashes[:2] == [(1, 3, "SIGABRT"), (2, 3, "SIGSEGV")] and len(crashes) == 5
    assert [crash_signal(c) for c in (0, 1, None, -int(signal.SIGKILL), -int(signal.SIGABRT))] == \
        [None, None, None, None, "SIGABRT"]
    with pytest.raises(ValueError, match="tries"):
        run_plan_process([sys.executable, "-c", ""], tries=0)
