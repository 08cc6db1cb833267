"""Run folders: what train.py leaves behind, written and read in one place.

    <output_dir>/
      model/                    the trained model: a UNet folder (stages 0 and 1; elr_training.models)
                                or adapter/ (save_pretrained) and control.json (stage 2)
      checkpoints/checkpoint-N/ resumable state (elr_training.checkpoint)
      logs/<project>/           TensorBoard (--report-to tensorboard or all)
      wandb/                    wandb's run files (--report-to wandb or all; WANDB_MODE=offline: no network)
      samples/step-N.png        every validation grid; samples.png the last one
      samples/pairs-step-N.png  the --validation-image pairs at each validation (stage 2); pairs.png the last
      loss_curves.png           training loss, raw and smoothed
      metrics.json              the run's numbers, its configuration and its environment
      stage0/, stage1/          the default chain's earlier stages (python/train.py --stage 2 alone)

`load_control_model` reads a stage-2 folder back for evaluate.py and the benchmarks.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .checkpoint import load_trained_weights
from .models import load_components, resolve_model_folder
from .run_log import plot_curves, write_json

MODEL = "model"
CHECKPOINTS = "checkpoints"
SAMPLES = "samples"
CONTENTS = "model/, checkpoints/, logs/, samples.png, loss_curves.png, metrics.json"


def model_dir(output_dir: str) -> str:
    return os.path.join(output_dir, MODEL)


def checkpoints_dir(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINTS)


def contents_line(output_dir: str) -> str:
    return f"run folder {output_dir}: {CONTENTS}"


def save_validation_grid(output_dir: str, grid: np.ndarray, step: int, name: str = "grid") -> str:
    """samples/step-<step>.png, copied to samples.png (the latest grid); another picture of the
    validation (name "pairs") as samples/<name>-step-<step>.png, copied to <name>.png."""
    from PIL import Image

    folder = os.path.join(output_dir, SAMPLES)
    os.makedirs(folder, exist_ok=True)
    prefix, latest = ("", "samples.png") if name == "grid" else (f"{name}-", f"{name}.png")
    path = os.path.join(folder, f"{prefix}step-{step}.png")
    Image.fromarray(grid).save(path)
    shutil.copyfile(path, os.path.join(output_dir, latest))
    return path


def write_metrics(output_dir: str, metrics: dict) -> str:
    path = os.path.join(output_dir, "metrics.json")
    write_json(path, metrics)
    return path


def save_control_model(folder: str, adapter, backbone: str, condition_types: Sequence[str], kind: str) -> None:
    """A stage-2 model folder: adapter/ (save_pretrained, safetensors) and control.json, which names
    the backbone and the condition types in the adapter's channel order."""
    os.makedirs(folder, exist_ok=True)
    adapter.save_pretrained(os.path.join(folder, "adapter"), safe_serialization=True)
    with open(os.path.join(folder, "control.json"), "w") as f:
        json.dump({"backbone": backbone, "condition_types": list(condition_types), "adapter": kind}, f, indent=2)


def summarise_chain(output_dir: str, earlier: Dict[str, dict], final: dict, wall_time: float) -> dict:
    """The default chain's run folder gets the loss curves of all three stages and one metrics.json
    holding stage 2's numbers with the earlier stages' under "earlier_stages"."""
    curves = {
        f"{name} train/loss": metrics["loss_history"].get("train/loss", [])
        for name, metrics in list(earlier.items()) + [("stage2", final)]
    }
    plot_curves(curves, os.path.join(output_dir, "loss_curves.png"), title="stages 0, 1, 2")
    drop = ("config", "loss_history")
    metrics = {
        **{k: v for k, v in final.items() if k != "loss_history"},
        "wall_time_all_stages_s": wall_time,
        "earlier_stages": {k: {m: v for m, v in e.items() if m not in drop} for k, e in earlier.items()},
    }
    write_metrics(output_dir, metrics)
    return metrics


@dataclass
class ControlModel:
    """What evaluate.py generates with: the backbone's parts, the adapter (None: no control) and
    the condition types the adapter takes, in its channel order."""

    components: object  # elr_training.models.Components
    adapter: Optional[torch.nn.Module]
    condition_types: List[str]
    description: dict = field(default_factory=dict)


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _existing(path: Optional[str], *relative_to: str) -> Optional[str]:
    """`path` as given, or relative to one of the folders (run folders store paths as typed at training)."""
    if path is None or os.path.exists(path):
        return path
    for folder in relative_to:
        candidate = os.path.join(folder, path)
        if os.path.exists(candidate):
            return candidate
    return path


def load_control_model(run: Optional[str] = None, adapter: Optional[str] = None, checkpoint: Optional[str] = None,
                       backbone: Optional[str] = None, condition_types: Optional[Sequence[str]] = None,
                       no_control: bool = False, device: str = "cpu") -> ControlModel:
    """The model as train.py leaves it.

    run: a stage-2 run folder (model/adapter/ from save_pretrained, model/control.json naming the
      backbone and the condition types). adapter: an adapter folder itself (control.json is looked
      for beside it). checkpoint: checkpoints/checkpoint-<step>/ of a run: its model.safetensors (the
      trained tensors by name) is loaded into the adapter of the run it belongs to (or --adapter).
    backbone: the frozen model folder (default: the one control.json names; "tiny" is not a
      backbone: a trained run is). no_control: the backbone alone (the "no control" row)."""
    run_dir = run
    if checkpoint and not run_dir and not adapter:
        run_dir = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))  # run/checkpoints/checkpoint-N
    adapter_dir = adapter or (os.path.join(model_dir(run_dir), "adapter") if run_dir else None)
    control = {}
    for folder in filter(None, [adapter_dir and os.path.dirname(os.path.abspath(adapter_dir)),
                                run_dir and model_dir(run_dir)]):
        if os.path.isfile(os.path.join(folder, "control.json")):
            control = _read_json(os.path.join(folder, "control.json"))
            break
    base = [os.path.dirname(os.path.abspath(run_dir))] if run_dir else []
    backbone = _existing(backbone or control.get("backbone"), *base, os.getcwd())
    if not backbone or not os.path.isdir(backbone):
        raise FileNotFoundError(f"no backbone: give --backbone (a model folder or a stage-1 run); control.json "
                                f"names {control.get('backbone')!r}")
    components = load_components(resolve_model_folder(backbone), "--backbone")
    types = list(condition_types or control.get("condition_types") or [])
    description = {"backbone": os.path.abspath(backbone), "adapter": None, "checkpoint": None}
    for part in (components.unet, *components.text_encoders, components.vae):
        if part is not None:
            part.to(device).eval()
    if no_control:
        return ControlModel(components, None, types or ["canny"], {**description, "control": "none"})

    from elr_ext.nn import LocalControlAdapter

    if not adapter_dir or not os.path.isdir(adapter_dir):
        raise FileNotFoundError(f"no adapter: give --run (a stage-2 run folder), --adapter (its model/adapter) or "
                                f"--checkpoint inside a run; looked for {adapter_dir!r}")
    if not types:
        raise ValueError("the condition types are unknown (no control.json beside the adapter): give --condition-types")
    model = LocalControlAdapter.from_pretrained(adapter_dir)
    description.update(adapter=os.path.abspath(adapter_dir), adapter_kind=model.config.adapter)
    if checkpoint:
        load_trained_weights(model, checkpoint)
        description["checkpoint"] = os.path.abspath(checkpoint)
    model.to(device).eval()
    return ControlModel(components, model, types, description)
