"""benchmarks/gpu_check.py, the one script a short GPU loan runs: its --dry-run on the CPU backends
(stages 1-3 end to end, in a subprocess as CI runs it), a failing stage or case recorded without
stopping the run, the time budget, the timing and profiler stage on tiny CPU cases, the reading of
Triton's compiled-kernel caches, stage 6's planner against the measured peak (the CPU planner end to
end; the card-name mapping, the child processes, failures and the budget on fakes) and the stage-7
choice of the dispatch table."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import types

import pytest
import torch

import elr_ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_check  # noqa: E402

OPS = ("fdn", "kron_lora_linear", "kron_delta", "kron_lora_conv2d", "lowrank_proj")
DTYPES = ("float32", "float16", "bfloat16")  # every CPU backend runs all five ops in all three


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {k: v for k, v in os.environ.items() if k != "ELR_EXT_BACKEND"}
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--dry-run", "--out", str(out)]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "gpu_dryrun_cpu.json") as f:
        data = json.load(f)
    return data, out, proc


def test_dry_run_writes_stages_1_to_3_and_nothing_else(dry_run):
    data, out, _ = dry_run
    assert data["dry_run"] and data["device_type"] == "cpu"
    assert {name: s["stage"] for name, s in data["stages"].items()} == {"environment": 1, "correctness": 2,
                                                                       "determinism": 3}
    for name, stage in data["stages"].items():
        assert stage["status"] == "ok", (name, stage.get("error"), stage.get("traceback"))
    env = data["stages"]["environment"]["result"]
    assert env["build_info"]["torch"] == torch.__version__
    assert env["device"]["copy_bandwidth_gbps"] > 0
    assert (out / "gpu_dryrun_cpu.md").read_text().startswith("# GPU check")
    assert sorted(os.listdir(out)) == ["gpu_dryrun_cpu.json", "gpu_dryrun_cpu.md"]


def test_dry_run_passes_every_op_backend_and_dtype_on_the_backend_asked_for(dry_run):
    data, _, _ = dry_run
    entries = data["stages"]["correctness"]["result"]["entries"]
    assert not data["stages"]["correctness"]["result"]["skipped"]
    backends = elr_ext.available_backends("cpu")
    assert data["backends"] == backends and "torch" in backends
    for op in OPS:
        for backend in backends:
            for dtype in DTYPES:
                cell = [e for e in entries if (e["op"], e["backend"], e["dtype"]) == (op, backend, dtype)]
                assert cell, f"no entry for {op} {backend} {dtype}"
                for e in cell:
                    assert e["status"] == "passed", e
                    assert e["dispatched"] == [backend], e  # judged on the backend it claims
                    assert e["checks"] and all(c["ok"] and c["err"] <= c["bound"] for c in e["checks"].values()), e
    grads = {name for e in entries if e["op"] == "kron_lora_linear" for name in e["checks"]}
    assert {"y", "dx", "dA", "dU", "dV", "dweight", "dbias"} <= grads
    grads = {name for e in entries if e["op"] == "lowrank_proj" for name in e["checks"]}
    assert {"y0", "dx", "ddown0", "dup0", "dbias0"} <= grads


def test_dry_run_records_determinism_for_every_entry(dry_run):
    data, _, _ = dry_run
    entries = data["stages"]["correctness"]["result"]["entries"]
    checked = {(e["op"], e["backend"], e["dtype"], e["case"]) for e in entries}
    det = data["stages"]["determinism"]["result"]["entries"]
    assert {(e["op"], e["backend"], e["dtype"], e["case"]) for e in det} == checked
    for e in det:
        assert isinstance(e["bitwise"], bool) and "error" not in e, e
        assert e["bitwise"] == (not e["differs"])


def _tiny_fdn():
    return gpu_check.fdn_case((1, 8, 3, 3), 4, "silu", False, False)


def _raising_case():
    def boom(t):
        raise RuntimeError("a kernel that raises")

    return gpu_check.OpCase("fdn", "raises", {}, lambda device: {"z": torch.ones(1, dtype=torch.float64)}, boom, boom,
                            ["out"], ["z"])


def test_a_failing_stage_is_recorded_and_the_next_stage_runs(tmp_path):
    report = gpu_check.Report(str(tmp_path / "gpu_x.json"), {"stages": {}})

    def broken(result):
        result["partial"] = 1
        raise ValueError("stage went wrong")

    gpu_check.run_stage(report, 2, "correctness", broken)
    gpu_check.run_stage(report, 3, "determinism", lambda result: result.update(done=True))
    with open(tmp_path / "gpu_x.json") as f:
        saved = json.load(f)["stages"]
    assert saved["correctness"]["status"] == "error" and "stage went wrong" in saved["correctness"]["error"]
    assert saved["correctness"]["result"] == {"partial": 1}  # what it had done is kept
    assert saved["determinism"]["status"] == "ok" and saved["determinism"]["result"] == {"done": True}
    assert (tmp_path / "gpu_x.md").exists()


def test_a_raising_case_is_recorded_and_the_other_cases_still_run(tmp_path):
    report = gpu_check.Report(str(tmp_path / "gpu_x.json"), {"stages": {}})
    result: dict = {}
    gpu_check.stage_correctness(result, report, [_raising_case(), _tiny_fdn()], ["torch"], [torch.float32],
                                torch.device("cpu"), 0, gpu_check.Budget(600))
    raised, passed = result["entries"]
    assert raised["status"] == "error" and "a kernel that raises" in raised["error"] and not raised["passed"]
    assert passed["status"] == "passed" and set(passed["checks"]) == {"out", "dz", "dgamma", "dbeta"}
    summary = gpu_check.markdown({"stages": {"correctness": {"stage": 2, "status": "ok", "result": result}}})
    assert "- error: fdn torch float32 raises: RuntimeError: a kernel that raises" in summary
    assert "- passed" not in summary  # the summary lists what went wrong, not what passed
    det: dict = {}
    gpu_check.stage_determinism(det, report, [_raising_case(), _tiny_fdn()], ["torch"], [torch.float32],
                                torch.device("cpu"), 0, gpu_check.Budget(600))
    assert det["entries"][0]["bitwise"] is None and "error" in det["entries"][0]
    assert det["entries"][1]["bitwise"] is True


def test_a_wrong_kernel_fails_the_tolerance_rule():
    case = _tiny_fdn()
    wrong = gpu_check.dataclasses.replace(case, ours=lambda t: (case.ours(t)[0] + 1e-3,))  # shifted, same gradients
    entry = gpu_check.check_case(wrong, "torch", torch.float32, torch.device("cpu"), 0)
    assert entry["status"] == "failed" and not entry["checks"]["out"]["ok"]
    assert all(entry["checks"][g]["ok"] for g in ("dz", "dgamma", "dbeta"))


def test_a_spent_budget_skips_the_remaining_cases_and_says_so(tmp_path):
    report = gpu_check.Report(str(tmp_path / "gpu_x.json"), {"stages": {}})
    result: dict = {}
    gpu_check.stage_correctness(result, report, [_tiny_fdn()], ["torch"], [torch.float32], torch.device("cpu"), 0,
                                gpu_check.Budget(0))
    assert result["entries"] == [] and "time budget" in result["skipped"][0]["reason"]
    perf: dict = {}
    gpu_check.stage_performance(perf, report, [_tiny_fdn()], ["torch"], [torch.float32], torch.device("cpu"), 0,
                                gpu_check.Budget(0), 1, 0.0, None)
    assert perf["rows"] == [] and perf["profiles"] == [] and len(perf["skipped"]) == 3  # profile, fwd+bwd, fwd
    assert all("time budget" in s["reason"] for s in perf["skipped"])


def test_performance_stage_times_profiles_and_feeds_the_dispatch_stage(tmp_path):
    cases = [_tiny_fdn(), gpu_check.kron_linear_case(2, 2, 2, 3, 4, 2, 5, True, False), _raising_case()]
    report = gpu_check.Report(str(tmp_path / "gpu_x.json"), {"stages": {}})
    perf: dict = {}
    gpu_check.stage_performance(perf, report, cases, ["torch"], [torch.float32], torch.device("cpu"), 0,
                                gpu_check.Budget(600), 1, 0.0, 10.0)
    arms = {(r["op"], r["mode"], r["arm"]) for r in perf["rows"]}
    assert arms == {(op, mode, arm) for mode in ("fwd", "fwd+bwd")
                    for op, arm in (("fdn", "torch"), ("fdn", "eager"), ("kron_lora_linear", "torch"),
                                    ("kron_lora_linear", "dense"))}
    for r in perf["rows"]:
        assert r["median_ms"] > 0
        assert ("gbps" in r and r["pct_of_copy"] > 0) == (r["op"] == "fdn")
        assert ("vs_dense" in r) == (r["op"] == "kron_lora_linear")
    assert [(e["case"], e["mode"]) for e in perf["errors"]] == [("raises", "fwd+bwd"), ("raises", "fwd")]
    assert all("a kernel that raises" in e["error"] for e in perf["errors"]) and not perf["skipped"]
    assert {p["op"] for p in perf["profiles"]} == {"fdn", "kron_lora_linear"}
    assert all(p["top"] and p["top"][0]["us_per_iter"] > 0 for p in perf["profiles"])
    data = {"stages": {"performance": {"result": perf}, "correctness": {"result": {"entries": []}}}}
    disp: dict = {}
    gpu_check.stage_dispatch(disp, data, ["float32"], (0, 0))
    # no cuda/triton arms on the CPU: nothing is decided, the table printed is the current one
    assert all(p["backend"] is None for p in disp["picks"].values())
    assert ast.literal_eval(disp["literal"].split("=", 1)[1]) == elr_ext.backends.GPU_DISPATCH


def _row(op, case, dtype, mode, arm, ms):
    return {"op": op, "case": case, "dtype": dtype, "mode": mode, "arm": arm, "median_ms": ms}


def test_dispatch_picks_the_faster_correct_backend_and_skips_a_failing_one():
    rows = []
    for case, cuda, triton in (("a", 1.0, 0.5), ("b", 2.0, 1.0)):  # triton 2x faster at FDN, but wrong
        rows += [_row("fdn", case, "bfloat16", "fwd+bwd", "cuda", cuda),
                 _row("fdn", case, "bfloat16", "fwd+bwd", "triton", triton)]
    for case, cuda, triton in (("a", 1.0, 0.8), ("b", 1.0, 0.9), ("c", 1.0, 1.1)):  # triton faster overall
        rows += [_row("kron_lora_linear", case, "float16", "fwd+bwd", "cuda", cuda),
                 _row("kron_lora_linear", case, "float16", "fwd+bwd", "triton", triton),
                 _row("kron_lora_linear", case, "float16", "fwd", "cuda", 1.0),
                 _row("kron_lora_linear", case, "float16", "fwd", "triton", 2.0)]  # fwd alone does not decide
    rows += [_row("lowrank_proj", "a", "float32", "fwd+bwd", "cuda", 1.0),
             _row("lowrank_proj", "a", "float32", "fwd+bwd", "triton", 1.5),
             _row("lowrank_proj", "a", "float32", "fwd+bwd", "torch", 0.1)]  # the reference is no candidate
    correct = {("fdn", "cuda", "bfloat16"): True, ("fdn", "triton", "bfloat16"): False,
               ("kron_lora_linear", "cuda", "float16"): True, ("kron_lora_linear", "triton", "float16"): True,
               ("kron_lora_conv2d", "cuda", "float16"): True, ("kron_lora_conv2d", "triton", "float16"): None,
               ("lowrank_proj", "cuda", "float32"): True, ("lowrank_proj", "triton", "float32"): True,
               ("lowrank_proj", "torch", "float32"): True}
    picks = gpu_check.pick_dispatch(rows, correct, ["float32", "float16", "bfloat16"])
    assert picks[("fdn", "bfloat16")]["backend"] == "cuda"
    assert picks[("fdn", "bfloat16")]["excluded"] == {"triton": "failed stage 2"}
    kron = picks[("kron_lora", "float16")]
    assert kron["backend"] == "triton" and kron["decided_by"] == "fwd+bwd"
    assert kron["ratios"]["cuda"]["fwd+bwd"]["cases"] == 3 and kron["ratios"]["cuda"]["fwd+bwd"]["geomean"] > 1
    assert picks[("lowrank_proj", "float32")]["backend"] == "cuda"
    assert picks[("fdn", "float32")]["backend"] is None  # nothing timed

    # a conv check that failed on triton takes triton out of the kron_lora entry
    broken = {**correct, ("kron_lora_conv2d", "triton", "float16"): False}
    assert gpu_check.pick_dispatch(rows, broken, ["float16"])[("kron_lora", "float16")]["backend"] == "cuda"

    existing = {("kron_lora", "float16"): {(8, 0): "triton"}, ("kron_lora", "bfloat16"): {(8, 0): "triton"}}
    literal = gpu_check.format_dispatch(picks, (9, 0), existing)
    assert literal.startswith("GPU_DISPATCH = {") and "# sm_90 measured: cuda/triton fwd+bwd" in literal
    assert ast.literal_eval(literal.split("=", 1)[1]) == {
        ("fdn", "bfloat16"): {(9, 0): "cuda"},
        ("kron_lora", "float16"): {(8, 0): "triton", (9, 0): "triton"},
        ("kron_lora", "bfloat16"): {(8, 0): "triton"},
        ("lowrank_proj", "float32"): {(9, 0): "cuda"},
    }


def test_correctness_table_keeps_a_failure_and_ignores_fallbacks():
    entries = [{"op": "fdn", "backend": "triton", "dtype": "float16", "status": s}
               for s in ("passed", "failed", "passed")]
    entries += [{"op": "kron_delta", "backend": "triton", "dtype": "float16", "status": "fallback"},
                {"op": "fdn", "backend": "cuda", "dtype": "float16", "status": "fallback"},
                {"op": "fdn", "backend": "cuda", "dtype": "float16", "status": "passed"}]
    assert gpu_check.correctness_table(entries) == {("fdn", "triton", "float16"): False,
                                                    ("kron_delta", "triton", "float16"): None,
                                                    ("fdn", "cuda", "float16"): True}


def test_triton_kernel_report_reads_registers_and_spills_from_the_jit_caches():
    triton = pytest.importorskip("triton")
    if triton.knobs.runtime.interpret:
        pytest.skip("under TRITON_INTERPRET=1 triton.jit makes interpreted functions, which have no compiled cache")
    import triton.language as tl

    @triton.autotune(configs=[triton.Config({"BLOCK": 64}, num_warps=4)], key=["n"])
    @triton.jit
    def _copy_kernel(x, y, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y + offs, tl.load(x + offs, mask=offs < n), mask=offs < n)

    meta = types.SimpleNamespace(num_warps=4, num_stages=3, shared=1024)
    src = types.SimpleNamespace(constexprs={(3,): 64}, fn=types.SimpleNamespace(arg_names=["x", "y", "n", "BLOCK"]))
    compiled = types.SimpleNamespace(n_regs=40, n_spills=2, metadata=meta, src=src)
    # Triton >= 3.2 keeps per device (kernel_cache, kernel_key_cache, target, backend, binder)
    _copy_kernel.fn.device_caches[0] = ({"key": compiled}, {}, None, None, None)
    _copy_kernel.cache[(1000,)] = _copy_kernel.configs[0]
    module = types.ModuleType("fake_triton_module")
    module._copy_kernel = _copy_kernel
    module.alias = _copy_kernel.fn  # the same kernel reached twice is reported once
    report = gpu_check.triton_kernel_report([module])
    (kernel,) = report["kernels"]
    assert kernel["found_in"] == "device_caches" and kernel["max_regs"] == 40 and kernel["max_spills"] == 2
    assert kernel["compiled"][0]["constexprs"] == {"BLOCK": 64} and kernel["compiled"][0]["num_warps"] == 4
    assert "BLOCK: 64" in kernel["autotuned"]["(1000,)"]
    assert report["any_spills"] and report["compiled_count"] == 1


def test_card_slug_names_the_results_file():
    assert gpu_check.card_slug("NVIDIA H200") == "nvidia-h200"
    assert gpu_check.card_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the full run would start")
def test_without_a_gpu_the_full_run_refuses_and_points_to_the_dry_run(capsys, tmp_path):
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert "--dry-run" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


# ------------------------------------------------------------------------------ stage 6: the planner
def test_plan_card_maps_cuda_device_names_to_plan_devices():
    from elr_ext.plan import DEVICES

    gib = 2 ** 30
    for name, props, key in (
            ("NVIDIA H100 80GB HBM3", ((9, 0), 79.1 * gib), "h100-80gb"),
            ("NVIDIA H100 80GB HBM3", (None, None), "h100-80gb"),
            ("NVIDIA H200", ((9, 0), 139.8 * gib), "h200-141gb"),
            ("NVIDIA H200", (None, None), "h200-141gb"),
            ("NVIDIA A100-SXM4-40GB", ((8, 0), 39.4 * gib), "a100-40gb"),
            ("NVIDIA A100 80GB PCIe", ((8, 0), 79.2 * gib), "a100-80gb"),
            ("NVIDIA A100-SXM4", ((8, 0), 79.2 * gib), "a100-80gb"),  # the memory the device has decides
            ("Tesla V100-SXM2-16GB", ((7, 0), 15.8 * gib), "v100-16gb"),
            ("Tesla T4", ((7, 5), 14.6 * gib), "t4-16gb"),
            ("NVIDIA L4", ((8, 9), 22.0 * gib), "l4-24gb"),
            ("NVIDIA GeForce RTX 4090", ((8, 9), 23.6 * gib), "rtx4090-24gb"),
            ("NVIDIA GeForce RTX 3090", ((8, 6), 23.7 * gib), "rtx3090-24gb")):
        card = gpu_check.plan_card(name, *props)
        assert (card["plan_device"], card["match"]) == (key, "name"), (name, card)
        assert card["plan_device"] in DEVICES and "reason" not in card
    nvl = gpu_check.plan_card("NVIDIA H100 NVL", (9, 0), 93.1 * gib)  # no 94 GB entry: the family's, and a note
    assert nvl["plan_device"] == "h100-80gb" and "93 GiB" in nvl["note"]

    unknown = gpu_check.plan_card("NVIDIA L40S")  # "l4" is not "L40S"
    assert unknown["match"] == "unknown" and unknown["plan_device"] is None and "L40S" in unknown["reason"]
    nearest = gpu_check.plan_card("NVIDIA B200", (10, 0), 178 * gib)
    assert nearest["match"] == "unknown" and nearest["plan_device"] == "h200-141gb"
    assert "nearest" in nearest["reason"] and "B200" in nearest["reason"]
    assert gpu_check.plan_card("NVIDIA GH200 480GB", (9, 0))["match"] == "unknown"


def _plan_json(arm, total, inputs, params=(10, 100)):
    split = {"weights": total // 2, "optimizer state": total // 4, "activations": total - total // 2 - total // 4
             - inputs, "inputs": inputs}
    return {"arm": arm, "job": "plan", "peak_memory_bytes": total, "flops": 1.0, "seconds_per_iteration": None,
            "peak": {"total": total, "split": split, "phase": "forward", "where": "unet.mid_block", "op": "conv"},
            "fits": None, "trainable_params": params[0], "total_params": params[1], "seconds_to_plan": 1.5}


def _measured_json(arm, peak, params=(10, 100)):
    return {"arm": arm, "job": "memory", "peak_memory_bytes": peak, "peak_total_bytes": peak + 12345,
            "trainable_params": params[0], "total_params": params[1]}


def test_planner_stage_records_planned_measured_and_error_for_each_entry(tmp_path):
    checks = [gpu_check.PlanCheck("tiny", 1, 32, "baseline", 1), gpu_check.PlanCheck("tiny", 1, 32, "elr", 1),
              gpu_check.PlanCheck("tiny", 2, 32, "kron", 1)]
    calls = []

    def runner(jobs, deadline):
        calls.append((jobs, deadline))
        out = []
        for job in jobs:
            arm = job.args[job.args.index("--child") + 1]
            if (arm, job.side) == ("elr", "plan"):  # torch killed the plan every time
                out.append({"result": None, "tries": 3, "seconds": 1.0, "returncode": -6,
                            "error": "killed by SIGABRT: corrupted double-linked list"})
            elif job.side == "plan":
                out.append({"result": _plan_json(arm, 1100 * 2 ** 10, 100 * 2 ** 10), "tries": 1, "seconds": 2.0})
            else:
                out.append({"result": _measured_json(arm, 800 * 2 ** 10, (10, 100) if arm == "baseline" else
                                                     (11, 100)), "tries": 1, "seconds": 3.0})
        return out

    report = gpu_check.Report(str(tmp_path / "gpu_x.json"), {"stages": {}})
    result: dict = {}
    budget = gpu_check.Budget(600)
    gpu_check.stage_planner(result, report, torch.device("cpu"), budget, checks, runner)
    (jobs, deadline), = calls
    assert deadline == pytest.approx(budget.start + 600, abs=1)  # the processes may run to the end of the budget
    assert [(j.entry, j.side) for j in jobs] == [(i, s) for i in range(3) for s in ("plan", "measured")]
    for job in jobs:
        assert job.args[0] == gpu_check.TRAIN_STEP and job.env["OMP_NUM_THREADS"] == "1"
        assert job.args[job.args.index("--config") + 1] == "tiny" and "--dtype" not in job.args  # fp32 on the CPU
        if job.side == "plan":
            assert {"--simulate", "--job", "plan"} <= set(job.args) and job.tries == gpu_check.PLAN_TRIES
            assert job.args[job.args.index("--plan-device") + 1] == "cpu"
        else:
            assert job.args[job.args.index("--job") + 1] == "memory" and job.tries == 1
            assert job.args[job.args.index("--device") + 1] == "cpu"
            assert job.env[gpu_check.harness._MMAP_ENV] == "65536"
    assert result["card"]["plan_device"] == "cpu" and result["autocast"] is None
    base, elr, kron = result["entries"]
    for e in (base, kron):
        assert e["status"] == "ok" and e["plan_device"] == "cpu"
        assert e["plan_peak_bytes"] == 1100 * 2 ** 10 and e["plan_inputs_bytes"] == 100 * 2 ** 10
        assert e["planned_bytes"] == 1000 * 2 ** 10 and e["measured_bytes"] == 800 * 2 ** 10
        assert e["error"] == pytest.approx(0.25)  # (planned - measured) / measured, the inputs off the plan
        assert e["plan_split"]["weights"] > 0 and e["plan_phase"] == "forward" and "failed" not in e
    assert base["same_model"] and not kron["same_model"]
    assert elr["status"] == "error" and "error" not in elr and "SIGABRT" in elr["failed"]["plan"]
    assert elr["measured_bytes"] == 800 * 2 ** 10 and elr["plan_process"]["tries"] == 3
    assert result["summary"] == {"compared": 2, "failed": 1, "skipped": 0, "error_min": pytest.approx(0.25),
                                 "error_max": pytest.approx(0.25)}
    summary = gpu_check.markdown({"stages": {"planner": {"stage": 6, "status": "ok", "result": result}}})
    assert "## 6. Planner against the measured peak" in summary
    assert "| tiny b1 32x32 | baseline | 1.0 | 0.8 | +25.0 % |" in summary
    assert "tiny b1 s32 elr: plan failed: `killed by SIGABRT" in summary
    assert "tiny b2 s32 kron: the planned and measured parameter counts differ" in summary


def test_planner_stage_on_a_gpu_plans_for_the_card_present(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: types.SimpleNamespace(total_memory=79 * 2 ** 30))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    seen = []

    def runner(jobs, deadline):
        seen.extend(jobs)
        return [{"result": None, "tries": 1, "seconds": 0.1, "error": "exit status 1: boom"} for _ in jobs]

    result: dict = {}
    report = gpu_check.Report(str(tmp_path / "gpu_x.json"), {"stages": {}})
    gpu_check.stage_planner(result, report, torch.device("cuda"), gpu_check.Budget(600), None, runner)
    assert result["card"]["plan_device"] == "h100-80gb" and result["autocast"] == "bfloat16"
    assert {(e["config"], e["arm"]) for e in result["entries"]} == {
        (c.config, c.arm) for c in gpu_check.GPU_PLAN_CHECKS} >= {("sd21", "baseline"), ("sd21", "elr")}
    assert all(e["status"] == "error" and set(e["failed"]) == {"plan", "measured"} for e in result["entries"])
    for job in seen:
        assert job.args[job.args.index("--dtype") + 1] == "bfloat16"
        if job.side == "plan":
            assert job.args[job.args.index("--plan-device") + 1] == "h100-80gb"
        else:
            assert job.args[job.args.index("--device") + 1] == "cuda"
    threads = {(j.args[j.args.index("--config") + 1], j.args[j.args.index("--child") + 1], j.side):
               int(j.env["OMP_NUM_THREADS"]) for j in seen}
    assert threads[("sd21", "elr", "measured")] >= threads[("sd21", "baseline", "measured")] >= 1
    assert threads[("sd21", "elr", "plan")] == 1


def test_planner_stage_skips_what_the_budget_cannot_hold(tmp_path):
    def runner(jobs, deadline):
        raise AssertionError("no process may start")

    report = gpu_check.Report(str(tmp_path / "gpu_x.json"), {"stages": {}})
    result: dict = {}
    gpu_check.stage_planner(result, report, torch.device("cpu"), gpu_check.Budget(0), None, runner)
    assert result["entries"] == [] and len(result["skipped"]) == len(gpu_check.CPU_PLAN_CHECKS)
    assert all("time budget" in s["reason"] for s in result["skipped"])

    checks = [gpu_check.PlanCheck("tiny", 1, 32, "baseline", 5), gpu_check.PlanCheck("sd21", 1, 64, "elr", 10 ** 6)]
    started = []
    result = {}
    gpu_check.stage_planner(result, report, torch.device("cpu"), gpu_check.Budget(600), checks,
                            lambda jobs, deadline: started.extend(jobs) or [{"result": None, "error": "x"}] * len(jobs))
    assert [e["config"] for e in result["entries"]] == ["tiny"] and {j.entry for j in started} == {0}
    (skip,) = result["skipped"]
    assert skip["config"] == "sd21" and "takes about 1000000 s" in skip["reason"]
    # the reserve keeps the end of the budget for stage 6: stages 2-4 see it spent, stage 6 does not
    budget = gpu_check.Budget(600, reserve=600)
    assert budget.spent() and budget.spent(0.45) and budget.remaining() > 500 and "kept for stage 6" in budget.reason()


def test_a_failing_planner_stage_is_recorded_and_the_later_stages_run(tmp_path, monkeypatch):
    def broken(jobs, deadline):
        raise RuntimeError("the runner broke")

    monkeypatch.setattr(gpu_check, "run_child_jobs", broken)
    monkeypatch.setattr(gpu_check, "stage_dispatch", lambda result, *args: result.update(ran=True))
    threads = torch.get_num_threads()
    try:
        assert gpu_check.main(["--dry-run", "--stages", "6,7", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)  # the dry run sets one thread
    with open(tmp_path / "gpu_dryrun_cpu.json") as f:
        data = json.load(f)
    planner, dispatch = data["stages"]["planner"], data["stages"]["dispatch"]
    assert (planner["stage"], dispatch["stage"]) == (6, 7)
    assert planner["status"] == "error" and "the runner broke" in planner["error"]
    assert planner["result"]["card"]["plan_device"] == "cpu"  # what it had done is kept
    assert dispatch["status"] == "ok" and dispatch["result"] == {"ran": True}
    assert "stage 6 (planner) failed" in (tmp_path / "gpu_dryrun_cpu.md").read_text()


def test_child_jobs_run_side_by_side_retry_a_signal_and_stop_at_the_deadline(tmp_path):
    marker = tmp_path / "tried"
    abort_once = (f"import os, signal, pathlib, json; p = pathlib.Path({str(marker)!r})\n"
                  "if not p.exists(): p.write_text('1'); os.kill(os.getpid(), signal.SIGABRT)\n"
                  "print('noise'); print(json.dumps({'ok': 2}))")
    jobs = [gpu_check.ChildJob(0, "plan", ["-c", abort_once], dict(os.environ), tries=3),
            gpu_check.ChildJob(1, "plan", ["-c", "import sys; sys.exit('bad input')"], dict(os.environ), tries=3),
            gpu_check.ChildJob(2, "measured", ["-c", "import time; time.sleep(60)"], dict(os.environ)),
            gpu_check.ChildJob(3, "measured", ["-c", "print('no json')"], dict(os.environ))]
    start = gpu_check.time.monotonic()
    retried, failed, slow, garbled = gpu_check.run_child_jobs(jobs, start + 4)
    assert gpu_check.time.monotonic() - start < 15  # side by side: the sleeper killed at the deadline
    assert retried["result"] == {"ok": 2} and retried["tries"] == 2 and "error" not in retried
    assert failed["result"] is None and failed["tries"] == 1 and "exit status 1: bad input" in failed["error"]
    assert slow["result"] is None and "time budget ran out" in slow["error"]
    assert garbled["result"] is None and "no JSON line" in garbled["error"]


@pytest.mark.slow
def test_dry_run_planner_stage_compares_the_cpu_plan_with_the_measured_peak(tmp_path):
    """Stage 6 end to end on the CPU: train_step.py's plan and memory processes for real (about 25 s)."""
    env = {k: v for k, v in os.environ.items() if k != "ELR_EXT_BACKEND"}
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--dry-run", "--stages", "6",
               "--out", str(tmp_path)]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "gpu_dryrun_cpu.json") as f:
        data = json.load(f)
    assert list(data["stages"]) == ["planner"]
    stage = data["stages"]["planner"]
    assert stage["status"] == "ok", (stage.get("error"), stage.get("traceback"))
    res = stage["result"]
    assert res["card"]["match"] == "cpu" and not res["skipped"]
    assert len(res["entries"]) == len(gpu_check.CPU_PLAN_CHECKS)
    for e in res["entries"]:
        assert e["status"] == "ok", e
        assert e["planned_bytes"] > 0 and e["measured_bytes"] > 0 and e["same_model"]
        assert e["planned_bytes"] == e["plan_peak_bytes"] - e["plan_inputs_bytes"]
        assert e["error"] == pytest.approx((e["planned_bytes"] - e["measured_bytes"]) / e["measured_bytes"])
        assert e["plan_split"]["weights"] > 0 and e["plan_split"]["optimizer state"] > 0
        assert abs(e["error"]) < 1.0  # recorded as it is; only a wildly wrong number fails here
    assert "## 6. Planner against the measured peak" in (tmp_path / "gpu_dryrun_cpu.md").read_text()
