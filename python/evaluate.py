#!/usr/bin/env python
"""Evaluate a trained control adapter with the paper's metrics (section 3.2; Tables 2 and 3).

    python python/evaluate.py --run runs/elr-stage2                      # a stage-2 run of train.py
    python python/evaluate.py --checkpoint runs/elr-stage2/checkpoints/checkpoint-200
    python python/evaluate.py --adapter RUN/model/adapter --backbone RUN/stage1 --num-samples 64 --steps 20
    python python/evaluate.py --run RUN --data UNI_FOLDER --segmentation-model SEGFORMER_DIR \
        --inception-weights pt_inception-2015-12-05-6726825d.pth --clip-model CLIP_VIT_L14_DIR

It generates one image per sample and condition type (that map alone, the others zeroed) with
ELRControlPipeline, on the synthetic validation split by default (scenes never trained on, with exact
edge maps and masks) or the first samples of any data set train.py reads (--data, --data-format), and
measures (exact definitions in elr_training/metrics.py):

  edge NMSE   Canny(generated, 100/200) vs the condition edge map, both in {0, 1}:
              mean((E_gen - E_cond)^2) / mean(E_cond^2) = (missed + spurious edge pixels) / edge pixels
  seg IoU     mean over classes; synthetic: the generated image labelled by the nearest colour of the
              data image's classes against the exact mask; real data: --segmentation-model on both
  FID         torchmetrics / torch-fidelity InceptionV3 with --inception-weights (a local file)
  CLIP score  torchmetrics CLIPScore with --clip-model (a local folder): cosine to the prompt, and
              to the sketch map for the sketch condition (Table 2's "Sketch Maps (CLIP Score)")

FID and the CLIP scores need pretrained weights; without them they are reported as unavailable with
the reason, never computed with random weights. Output in --output-dir: metrics.json, table.md
(laid out like Tables 2 and 3, with the paper's numbers beside), grid.png (condition / generated /
data per row).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

try:
    import elr_ext  # noqa: F401
except ImportError:  # a checkout built in place but not pip-installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from elr_ext.nn import count_parameters  # noqa: E402
from elr_training import evaluation  # noqa: E402
from elr_training.metrics import measured  # noqa: E402
from elr_training.models import latent_factor_of  # noqa: E402
from elr_training.run_folder import load_control_model  # noqa: E402
from elr_training.run_log import write_json  # noqa: E402
from elr_training.sampling import image_grid, map_to_uint8  # noqa: E402

# The paper's Tables 2 and 3, for the table's reference columns.
PAPER_COLUMNS = {
    "Uni-ControlNet (paper)": {"peak_memory": "20GB", "trainable_params": "1271M", "seconds_per_iteration": "5.72",
                               "fid": "27.7", "clip_score": "0.82", "sketch_clip_score": "0.49",
                               "edge_nmse": "0.60", "segmentation_iou": "0.70"},
    "ELR Stage II (paper)": {"peak_memory": "14GB", "trainable_params": "750M", "seconds_per_iteration": "2.15",
                             "fid": "27.5", "sketch_clip_score": "0.45", "edge_nmse": "0.60",
                             "segmentation_iou": "0.74"},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    what = p.add_argument_group("the model (as train.py writes it)")
    what.add_argument("--run", default=None, help="stage-2 run folder (model/adapter, model/control.json); "
                      "default runs/elr-stage2 when neither --adapter nor --checkpoint is given")
    what.add_argument("--adapter", default=None, help="adapter folder (a run's model/adapter)")
    what.add_argument("--checkpoint", default=None, help="checkpoints/checkpoint-<step> of a run: its weights")
    what.add_argument("--backbone", default=None, help="frozen model folder (default: what control.json names)")
    what.add_argument("--condition-types", nargs="+", default=None, help="when no control.json says them")
    what.add_argument("--no-control", action="store_true", help="evaluate the backbone without the adapter")
    what.add_argument("--label", default=None, help="column name in the table (default: adapter kind)")
    data = p.add_argument_group("data")
    data.add_argument("--data", default="synthetic", help="'synthetic' or a data folder / shards (train.py's formats)")
    data.add_argument("--data-format", default="auto")
    data.add_argument("--caption-column", default="text")
    data.add_argument("--num-samples", type=int, default=16)
    data.add_argument("--resolution", type=int, default=None, help="default: the run's training resolution")
    data.add_argument("--seed", type=int, default=0, help="data seed (synthetic) and noise seed of sample i: seed + i")
    gen = p.add_argument_group("generation")
    gen.add_argument("--steps", type=int, default=20, help="DDIM steps")
    gen.add_argument("--guidance-scale", type=float, default=2.0)
    gen.add_argument("--conditioning-scale", type=float, default=1.0)
    gen.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    metrics = p.add_argument_group("metrics that need weights (local paths only)")
    metrics.add_argument("--inception-weights", default=None, help="torch-fidelity's pt_inception-2015-12-05 .pth")
    metrics.add_argument("--clip-model", default=None, help="CLIP folder (CLIPModel + CLIPProcessor files)")
    metrics.add_argument("--segmentation-model", default=None, help="transformers semantic-segmentation folder")
    metrics.add_argument("--efficiency-json", default=None, help="a benchmarks/results/train_step_*.json: its "
                         "memory and s/it fill the efficiency rows")
    metrics.add_argument("--efficiency-arm", default=None, help="its row (default: elr for kron, baseline for full)")
    p.add_argument("--output-dir", default="runs/evaluation")
    args = p.parse_args(argv)
    if not (args.run or args.adapter or args.checkpoint):
        args.run = "runs/elr-stage2"
    return args


def training_resolution(args, model) -> int:
    """The run's training resolution (metrics.json), else the backbone's native image size."""
    for folder in filter(None, [args.run, args.checkpoint and os.path.dirname(os.path.dirname(args.checkpoint))]):
        path = os.path.join(folder, "metrics.json")
        if os.path.isfile(path):
            with open(path) as f:
                resolution = json.load(f).get("config", {}).get("resolution")
            if resolution:
                return int(resolution)
    return int(model.components.unet.config.sample_size) * latent_factor_of(model.components)


def efficiency_rows(args, adapter_kind: str) -> dict:
    """Memory and s/it of the matching arm of a train_step benchmark run (measured there, not here)."""
    if not args.efficiency_json:
        return {}
    with open(args.efficiency_json) as f:
        result = json.load(f)
    arm = args.efficiency_arm or ("elr" if adapter_kind == "kron" else "baseline")
    row = next((r for r in result["rows"] if r["arm"] == arm), None)
    if row is None:
        raise ValueError(f"--efficiency-json {args.efficiency_json} has no arm {arm!r}")
    source = f"{args.efficiency_json} arm {arm} ({result['config_description']}, {result['device']})"
    out = {}
    if row.get("peak_memory_bytes") is not None:
        out["peak_memory"] = measured(row["peak_memory_bytes"], source=source)
    if row.get("seconds_per_iteration") is not None:
        out["seconds_per_iteration"] = measured(row["seconds_per_iteration"], source=source)
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    print("evaluate.py settings: " + ", ".join(f"{k}={v}" for k, v in vars(args).items()), flush=True)
    started = time.perf_counter()

    # ---------------------------------------------------------------- the model and the data
    model = load_control_model(args.run, args.adapter, args.checkpoint, args.backbone, args.condition_types,
                               args.no_control, args.device)
    resolution = args.resolution or training_resolution(args, model)
    print(f"model: {model.description}; conditions {model.condition_types}; {resolution} px", flush=True)
    samples = evaluation.evaluation_samples(model.condition_types, args.num_samples, resolution, args.data,
                                            args.data_format, args.seed, segmentation_model=args.segmentation_model,
                                            caption_column=args.caption_column)

    # ---------------------------------------------------------------- generate and measure
    metrics, generated = evaluation.evaluate_model(
        model, samples, args.steps, args.guidance_scale, args.conditioning_scale, args.seed,
        args.inception_weights, args.clip_model, args.segmentation_model, args.device)
    kind = "none" if model.adapter is None else model.adapter.config.adapter
    if model.adapter is not None:
        counts = model.adapter.parameter_counts()
        backbone = count_parameters(model.components.unet)
        metrics["trainable_params"] = counts["trainable"]
        metrics["total_params"] = counts["total"] + backbone
        metrics["adapter_parameter_counts"] = counts
        metrics["backbone_params"] = backbone
    metrics.update(efficiency_rows(args, kind))

    # ---------------------------------------------------------------- write metrics.json, table.md, grid.png
    os.makedirs(args.output_dir, exist_ok=True)
    label = args.label or {"kron": "ELR (kron)", "full": "Uni-ControlNet-style (full)", "none": "no control"}[kind]
    result = {"label": label, "model": model.description, "adapter_kind": kind, "resolution": resolution,
              "data": args.data, "steps": args.steps, "guidance_scale": args.guidance_scale,
              "conditioning_scale": args.conditioning_scale, "seed": args.seed, "device": args.device,
              "wall_time_s": time.perf_counter() - started, "metrics": metrics}
    write_json(os.path.join(args.output_dir, "metrics.json"), result)
    table = evaluation.table2_markdown({label: metrics, **PAPER_COLUMNS},
                                       title=f"{label}: {args.num_samples} samples of {args.data}, {resolution} px, "
                                             f"{args.steps} DDIM steps (n/a: see metrics.json for the reason)")
    with open(os.path.join(args.output_dir, "table.md"), "w") as f:
        f.write(table)
    columns = {"data": [s["image"] for s in samples]}
    for t in model.condition_types:
        columns[f"{t} map"] = [map_to_uint8(s["conditions"][evaluation.condition_slice(
            model.condition_types, t)]) for s in samples]
        columns[f"from {t}"] = generated[t]
    Image.fromarray(image_grid(columns)).save(os.path.join(args.output_dir, "grid.png"))
    print(table)
    for key in ("edge_nmse", "edge_f_score", "segmentation_iou", "fid", "clip_score", "sketch_clip_score"):
        m = metrics.get(key)
        if isinstance(m, dict) and not m["available"]:
            print(f"{key}: unavailable ({m['reason']})")
    print(f"wrote {args.output_dir}/metrics.json, table.md, grid.png in {result['wall_time_s']:.0f} s")
    return result


if __name__ == "__main__":
    from elr_training.cli import run_cli

    run_cli(main, "evaluate.py")
