"""benchmarks/gpu_check.py, the one script a short GPU loan runs: its --dry-run on the CPU backends
(stages 1-3 end to end, in a subprocess as CI runs it), a failing stage or case recorded without
stopping the run, the time budget, the timing and profiler stage on tiny CPU cases, the reading of
Triton's compiled-kernel caches, and the stage-6 choice of the dispatch table."""

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
