#!/usr/bin/env python
"""Controllability at an equal step budget (paper Tables 2 and 3, performance rows) and the Stage I
table (Table 1), on the synthetic scenes, driven through python/train.py's stages.

What runs (each training a `python python/train.py ...` command, printed and stored in the JSON):
  teacher          --stage 0: the tiny dense UNet trained from scratch (plays Stable Diffusion)
  student-kd       --stage 1 --teacher teacher: decompose + distillation (ELR-Diffusion Stage I)
  student-nokd     --stage 1 --teacher teacher --kd-weight 0 --task-loss-weight 1: the decomposed UNet
                   trained with the plain diffusion loss ("Decomposed U-Net w/o Distill."), when
                   train.py has the --kd-weight switch
  full             --stage 2 --adapter full on the dense teacher: the Uni-ControlNet-style baseline
  elr              --stage 2 --adapter kron on student-kd: ELR Stage II, the same steps, data and seed
  (no control)     the teacher without any adapter, the same noise

Then every Stage II model generates from the same held-out synthetic scenes and noise (canny and seg
conditions, one at a time) and is measured with python/elr_training/evaluation.py (edge NMSE,
segmentation IoU; FID and CLIP score only with --inception-weights / --clip-model). Stage I rows get
their parameter count, the held-out denoising MSE (fixed noise and timesteps, against the true noise),
the distillation MSE against the teacher, and FID / CLIP score when weights are given.

Targets: ELR's edge NMSE and IoU within 10% of the full baseline's, and far better than no
control (here: at least 25% better, relative).

    python benchmarks/controllability.py --quick          # tiny budget, a smoke run (minutes)
    python benchmarks/controllability.py                  # train.py's tiny presets (300 / 30 / 300 steps)
    python benchmarks/controllability.py --reuse          # evaluate the runs already in --work-dir

Writes benchmarks/results/controllability[_quick].{md,json,png} and controllability_stage1[_quick].{md,json}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from PIL import Image  # noqa: E402

from elr_ext.nn import count_parameters  # noqa: E402
from elr_training import evaluation, run_folder, sampling  # noqa: E402
from elr_training.metrics import clip_score, frechet_inception_distance, measured, unavailable  # noqa: E402

RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")
TRAIN = os.path.join(ROOT, "python", "train.py")
CONDITIONS = ["canny", "seg"]
WITHIN = 0.10  # ELR within 10% of the baseline
FAR_BETTER = 0.25  # and at least 25% better than no control


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", default=os.path.join("runs", "controllability"), help="where the runs go")
    p.add_argument("--teacher-steps", type=int, default=None, help="default: train.py's tiny preset")
    p.add_argument("--stage1-steps", type=int, default=None, help="default: train.py's tiny preset")
    p.add_argument("--stage2-steps", type=int, default=None, help="the equal budget of full and elr (default: the preset)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch (default: the presets' 16)")
    p.add_argument("--synthetic-size", type=int, default=None)
    p.add_argument("--num-samples", type=int, default=32, help="held-out scenes evaluated")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps of generation")
    p.add_argument("--guidance-scale", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inception-weights", default=None)
    p.add_argument("--clip-model", default=None)
    p.add_argument("--reuse", action="store_true", help="keep runs whose model/ exists instead of training again")
    p.add_argument("--quick", action="store_true", help="2 training steps per stage, 4 scenes, 2 DDIM steps")
    p.add_argument("--out-dir", default=RESULTS_DIR)
    args = p.parse_args(argv)
    if args.quick:
        args.teacher_steps = args.teacher_steps or 2
        args.stage1_steps = args.stage1_steps or 2
        args.stage2_steps = args.stage2_steps or 2
        args.batch_size = args.batch_size or 4
        args.synthetic_size = args.synthetic_size or 32
        args.num_samples, args.steps = min(args.num_samples, 4), min(args.steps, 2)
    return args


def has_kd_switch() -> bool:
    """Whether train.py's Stage I can turn the distillation loss off (the "w/o distillation" row)."""
    from elr_training.config import DistillConfig

    return "kd_weight" in {f.name for f in dataclasses.fields(DistillConfig)}


def train(name: str, flags: list, args, log: dict) -> str:
    """Run one train.py stage into work_dir/name (or keep it with --reuse); returns the run folder."""
    folder = os.path.join(args.work_dir, name)
    common = ["--output-dir", folder, "--seed", str(args.seed), "--validation-steps", "0"]
    if args.quick:  # the final validation grid of each run: small
        common += ["--num-validation-images", "2", "--num-inference-steps", "2"]
    for flag, value in (("--train-batch-size", args.batch_size), ("--synthetic-size", args.synthetic_size)):
        if value is not None:
            common += [flag, str(value)]
    command = [sys.executable, TRAIN] + flags + common
    log[name] = {"command": " ".join(shlex.quote(c) for c in command[1:]), "folder": folder}
    if args.reuse and os.path.isdir(os.path.join(folder, "model")):
        print(f"[{name}] reusing {folder}", flush=True)
        log[name]["reused"] = True
    else:
        print(f"[{name}] {log[name]['command']}", flush=True)
        started = time.perf_counter()
        res = subprocess.run(command, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"train.py failed for {name}:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
        log[name]["train_wall_s"] = time.perf_counter() - started
    metrics_path = os.path.join(folder, "metrics.json")
    if os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            m = json.load(f)
        log[name].update({k: m.get(k) for k in ("global_step", "s_per_it_median", "fixed_batch_loss_before",
                                                 "fixed_batch_loss_after", "trained_parameters")})
    return folder


def steps_flag(value) -> list:
    return [] if value is None else ["--max-train-steps", str(value)]


@torch.no_grad()
def denoising_errors(unet, teacher, components, samples, seed: int) -> dict:
    """Held-out MSE of the UNet's prediction against the true target (and against the teacher's), at
    fixed noise and timesteps drawn from `seed`: comparable across the Stage I rows."""
    from elr_training.models import encode_images, encode_prompts
    from elr_training.losses import noisy_inputs

    g = torch.Generator().manual_seed(seed)
    pixels = torch.stack([s["pixel_values"] for s in samples])
    text = encode_prompts(components, [s["caption"] for s in samples], "cpu", size=pixels.shape[-2:])
    latents = encode_images(components, pixels, g)
    noisy, t, _, target = noisy_inputs(components.noise_scheduler, latents, g)
    out = unet(noisy, t, **text.unet_kwargs()).sample.float()
    ref = teacher(noisy, t, **text.unet_kwargs()).sample.float()
    return {"denoising_mse": measured(float(torch.mean((out - target.float()) ** 2)),
                                    num_samples=len(samples)),
            "kd_mse_vs_teacher": measured(float(torch.mean((out - ref) ** 2)))}


def stage1_table(runs: dict, samples, args, log: dict) -> dict:
    """Table 1's rows: teacher, decomposed without distillation, decomposed with distillation."""
    from elr_training.models import load_components

    teacher = load_components(runs["teacher"], "teacher")
    rows = {}
    names = {"teacher": "Teacher (dense, plays Stable Diffusion)", "student-nokd": "Decomposed U-Net w/o Distill.",
             "student-kd": "ELR-Diffusion Stage I (decomposed + distillation)"}
    for key, label in names.items():
        if key not in runs:
            reason = log.get(key, {}).get("reason", "not trained")
            rows[label] = {k: unavailable(reason) for k in ("fid", "clip_score", "denoising_mse")}
            continue
        components = load_components(runs[key], key)
        unet = components.unet.eval()
        row = {"total_params": count_parameters(unet),
               **denoising_errors(unet, teacher.unet.eval(), teacher, samples, args.seed)}
        model = run_folder.ControlModel(components, None, ["canny"])
        images = evaluation.generate_images(model, samples, None, args.steps, args.guidance_scale, 1.0, args.seed)
        row["fid"] = frechet_inception_distance([s["image"] for s in samples], images, args.inception_weights)
        row["clip_score"] = clip_score(images, [s["caption"] for s in samples], args.clip_model)
        rows[label] = row
    return rows


def verdicts(columns: dict) -> dict:
    """ELR against the full baseline (within 10%) and against no control (at least 25% better)."""
    def value(column, key):
        m = columns[column].get(key)
        return m.get("value") if isinstance(m, dict) else None

    out = {}
    for key, lower_better in (("edge_nmse", True), ("edge_f_score", False), ("segmentation_iou", False)):
        elr, base, none = (value(c, key) for c in ("ELR Stage II (kron)", "Uni-ControlNet-style (full)",
                                                   "no control"))
        if None in (elr, base, none):
            out[key] = {"met": None, "reason": "a value is unavailable"}
            continue
        if lower_better:
            within = elr <= base * (1 + WITHIN)
            better = elr <= none * (1 - FAR_BETTER)
        else:
            within = elr >= base * (1 - WITHIN)
            better = elr >= none * (1 + FAR_BETTER)
        out[key] = {"elr": elr, "baseline": base, "no_control": none, "elr_over_baseline": elr / base if base else None,
                    "elr_over_no_control": elr / none if none else None, "within_10pct_of_baseline": within,
                    "at_least_25pct_better_than_no_control": better, "met": within and better}
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    print("controllability settings: " + ", ".join(f"{k}={v}" for k, v in vars(args).items()), flush=True)
    started = time.perf_counter()
    os.makedirs(args.work_dir, exist_ok=True)
    log: dict = {}

    # ---------------------------------------------------------------- train (or reuse) every model
    runs = {"teacher": train("teacher", ["--stage", "0"] + steps_flag(args.teacher_steps), args, log)}
    stage1 = ["--stage", "1", "--teacher", runs["teacher"]] + steps_flag(args.stage1_steps)
    runs["student-kd"] = train("student-kd", stage1, args, log)
    if has_kd_switch():
        runs["student-nokd"] = train("student-nokd", stage1 + ["--kd-weight", "0", "--task-loss-weight", "1"], args, log)
    else:
        log["student-nokd"] = {"reason": "train.py has no --kd-weight switch to turn the distillation loss off"}
    stage2 = ["--stage", "2", "--condition-types", *CONDITIONS] + steps_flag(args.stage2_steps)
    runs["full"] = train("full", stage2 + ["--adapter", "full", "--backbone", runs["teacher"]], args, log)
    runs["elr"] = train("elr", stage2 + ["--adapter", "kron", "--backbone", runs["student-kd"]], args, log)

    # ---------------------------------------------------------------- the same held-out scenes and noise for all
    from elr_training.models import load_components

    resolution = load_components(runs["teacher"], "teacher").unet.config.sample_size
    samples = evaluation.evaluation_samples(CONDITIONS, args.num_samples, resolution, seed=args.seed)
    models = {
        "no control": run_folder.load_control_model(backbone=runs["teacher"], condition_types=CONDITIONS,
                                                    no_control=True),
        "Uni-ControlNet-style (full)": run_folder.load_control_model(run=runs["full"]),
        "ELR Stage II (kron)": run_folder.load_control_model(run=runs["elr"]),
    }
    columns, grid = {}, {"data": [s["image"] for s in samples]}
    for kind in CONDITIONS:
        grid[f"{kind} map"] = [sampling.map_to_uint8(s["conditions"][evaluation.condition_slice(CONDITIONS, kind)])
                               for s in samples]
    short = {"no control": "none", "Uni-ControlNet-style (full)": "full", "ELR Stage II (kron)": "elr"}
    for label, model in models.items():
        print(f"== evaluating {label}", flush=True)
        metrics, generated = evaluation.evaluate_model(
            model, samples, args.steps, args.guidance_scale, 1.0, args.seed, args.inception_weights, args.clip_model)
        if model.adapter is not None:
            counts = model.adapter.parameter_counts()
            metrics["trainable_params"] = counts["trainable"]
            metrics["total_params"] = counts["total"] + count_parameters(model.components.unet)
        columns[label] = metrics
        for kind in CONDITIONS if model.adapter is not None else CONDITIONS[:1]:
            grid[short[label] + (f" {kind}" if model.adapter is not None else "")] = generated[kind]
    checks = verdicts(columns)
    stage1 = stage1_table(runs, samples, args, log)

    # ---------------------------------------------------------------- write the tables
    def trained(name):  # the steps each run actually took, from its metrics.json
        return log.get(name, {}).get("global_step", "?")

    budget = (f"training steps: teacher {trained('teacher')}, stage 1 {trained('student-kd')}, stage 2 "
              f"{trained('full')} (full) / {trained('elr')} (ELR); {args.num_samples} held-out synthetic scenes, "
              f"{args.steps} DDIM steps, guidance {args.guidance_scale}")
    machine = f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
    table = evaluation.table2_markdown(columns, delta=("Uni-ControlNet-style (full)", "ELR Stage II (kron)"),
                                       title=f"Controllability at an equal step budget ({budget}; {machine})")
    lines = [table, "Targets: ELR within 10% of the baseline and at least 25% better than no control:"]
    for key, v in checks.items():
        if v["met"] is None:
            lines.append(f"- {key}: not measured ({v['reason']})")
        else:
            lines.append(f"- {key}: ELR {v['elr']:.3f}, baseline {v['baseline']:.3f}, no control {v['no_control']:.3f}"
                         f" -> within 10%: {v['within_10pct_of_baseline']}, 25% better than no control: "
                         f"{v['at_least_25pct_better_than_no_control']} ({'met' if v['met'] else 'NOT met'})")
    table1 = evaluation.table1_markdown(stage1, title=f"Stage I on the synthetic scenes ({budget}; {machine})")
    suffix = "_quick" if args.quick else ""
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"controllability{suffix}")
    result = {"benchmark": "controllability", "budget": budget, "machine": machine, "quick": args.quick,
              "time": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_time_s": time.perf_counter() - started,
              "runs": log, "columns": _strip(columns), "targets": checks}
    _write(stem + ".md", "\n".join(lines) + "\n")
    _write(stem + ".json", json.dumps(result, indent=1, default=float))
    Image.fromarray(sampling.image_grid(grid, height=96)).save(stem + ".png")
    stem1 = os.path.join(args.out_dir, f"controllability_stage1{suffix}")
    _write(stem1 + ".md", table1)
    _write(stem1 + ".json", json.dumps({"benchmark": "controllability_stage1", "budget": budget, "machine": machine,
                                        "rows": _strip(stage1), "runs": log}, indent=1, default=float))
    print("\n".join(lines))
    print(table1)
    print(f"wrote {stem}.md/.json/.png and {stem1}.md/.json in {result['wall_time_s']:.0f} s")
    return result


def _strip(columns: dict) -> dict:
    """The JSON keeps every metric but the per-sample lists (kept in evaluate.py's own metrics.json)."""
    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if k != "per_sample"}
        if isinstance(v, (np.floating, np.integer)):
            return v.item()
        return v
    return clean(columns)


def _write(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
