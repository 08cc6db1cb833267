"""What a run leaves to read: the trackers' logs (--report-to: TensorBoard in logs/, wandb in wandb/,
both through accelerate's tracker classes), the loss curves as PNG and metrics.json. Only the main
process writes; the others get a RunLog that records nothing."""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from typing import Dict, List, Optional

import numpy as np


def tracker_names(report_to: str) -> List[str]:
    """--report-to -> the accelerate trackers it starts."""
    return {"all": ["tensorboard", "wandb"], "none": []}.get(report_to, [report_to])


def start_trackers(report_to: str, output_dir: str, project_name: str, run_name: str) -> list:
    """accelerate's TensorBoardTracker (logs/<project>/ in the run folder) and WandBTracker (project
    `project_name`, run `run_name`, files under <output_dir>/wandb/), started."""
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    trackers = []
    for name in tracker_names(report_to):
        if name == "tensorboard":
            tracker = TensorBoardTracker(project_name, os.path.join(output_dir, "logs"))
        elif name == "wandb":
            tracker = WandBTracker(project_name, name=run_name, dir=output_dir)
        else:
            raise ValueError(f"--report-to {report_to!r}: unknown tracker {name!r}")
        tracker.start()
        trackers.append(tracker)
    return trackers


def hyperparameters(config: dict) -> Dict[str, object]:
    """A configuration as the trackers take it: bool, int, float or str values (lists, dicts and None
    as their text)."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in config.items()}


class RunLog:
    def __init__(self, output_dir: str, enabled: bool = True, report_to: str = "tensorboard",
                 project_name: str = "elr-diffusion", run_name: Optional[str] = None):
        self.output_dir, self.enabled = output_dir, enabled
        self.history: Dict[str, List[tuple]] = defaultdict(list)
        self.trackers = []
        if enabled:
            run_name = run_name or os.path.basename(os.path.normpath(output_dir))
            self.trackers = start_trackers(report_to, output_dir, project_name, run_name)

    def config(self, values: dict, text: str) -> None:
        """The run's configuration: as hyper-parameters to every tracker, and as text (`describe`, with
        each value's source) to TensorBoard."""
        for tracker in self.trackers:
            tracker.store_init_configuration(hyperparameters(values))
            if tracker.name == "tensorboard":
                tracker.log({"config": text.replace("\n", "  \n")}, step=0)

    def scalars(self, values: Dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self.history[name].append((step, float(value)))
        for tracker in self.trackers:
            tracker.log({k: float(v) for k, v in values.items()}, step=step)

    def image(self, name: str, image: np.ndarray, step: int) -> None:
        """uint8 [H, W, 3]."""
        for tracker in self.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({name: image[None]}, step=step, dataformats="NHWC")
            else:
                tracker.log_images({name: [image]}, step=step)

    def flush(self) -> None:
        for tracker in self.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.flush()

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []

    def save_loss_curves(self, path: Optional[str] = None, prefix: str = "train/") -> Optional[str]:
        """All scalars under `prefix` with 'loss' in their name, one panel each, raw and smoothed."""
        if not self.enabled:
            return None
        curves = {k: v for k, v in self.history.items() if k.startswith(prefix) and "loss" in k}
        path = path or os.path.join(self.output_dir, "loss_curves.png")
        plot_curves(curves, path)
        return path


def plot_curves(curves: Dict[str, List[tuple]], path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    n = max(len(curves), 1)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.2), squeeze=False)
    for ax, (name, points) in zip(axes[0], sorted(curves.items())):
        steps, values = zip(*points) if points else ((), ())
        ax.plot(steps, values, lw=0.8, alpha=0.45, label="per step")
        if len(values) >= 5:
            window = max(len(values) // 20, 5)
            kernel = np.ones(window) / window
            smooth = np.convolve(values, kernel, mode="valid")
            ax.plot(steps[window - 1 :], smooth, lw=1.8, label=f"mean of {window}")
        ax.set_title(name)
        ax.set_xlabel("optimiser step")
        positive = [v for v in values if v > 0]
        if positive and max(positive) / min(positive) > 30:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path: str, values: dict) -> None:
    """JSON with NaN written as null (strict JSON), atomically."""

    def clean(v):
        if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, np.generic):
            return clean(v.item())
        return v

    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(clean(values), f, indent=2)
    os.replace(tmp, path)


# The packages whose versions can change a run's numbers (kernels, schedulers, image decoding, Canny).
RESULT_PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "numpy", "opencv-python-headless", "pillow",
                   "scipy", "safetensors")


def environment() -> Dict[str, object]:
    """What the numbers of a run depend on beyond its configuration: package versions, the CPU and
    torch's thread count (metrics.json records it; the README says what may differ across CPUs)."""
    import platform
    from importlib import metadata

    import torch

    versions = {}
    for name in RESULT_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "packages": versions,
        "cpu": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
