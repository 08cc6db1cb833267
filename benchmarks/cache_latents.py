"""What `train.py --cache-latents` saves in a Stage II training step: the step that encodes its batch
(VAE encode of the image + text encoder on the caption + adapter and UNet forward, backward, AdamW)
against the same step on the batch read from the cache (a draw from the cached latent distribution,
the cached text states). Both run python/train.py's own ControlStage.loss, on the same models.

    python benchmarks/cache_latents.py                  # SD 2.1 shapes, random weights, 256 px, batch 1, CPU
    python benchmarks/cache_latents.py --quick          # tiny-sd15 at 32 px: a smoke run

The models: SD 2.1's UNet (dense, the --pretrained backbone; the kron adapter on it), VAE and OpenCLIP-H
text encoder (elr_ext.architectures) with random weights, a CLIP tokenizer padded to 77 tokens. The
batch: one synthetic scene at 256 px with its Canny map.

Measured:
  time     median seconds per call, the arms interleaved in one process (benchmarks/harness.time_arms):
           the whole step with encoding and from the cache, and its parts: VAE encode, text encode, the
           draw from the cache; the load average before and after
  weights  the bytes of the parts the cache takes off the device: the VAE's encoder (and quant_conv),
           the text encoder(s)
  memory   one fresh process per arm, glibc's mmap threshold fixed (harness.run_fresh(memory=True)):
           the RSS the set-up leaves (weights, optimiser state after a warm-up step), and the peak RSS of
           the measured steps over it; in the cache's arm the VAE encoder is freed and the text encoder
           deleted before the measurement, as they are off the device in training
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))
from elr_training.config import ControlConfig, make_config  # noqa: E402
from elr_training.data import cache as latent_cache  # noqa: E402
from elr_training.data import condition_maker_for  # noqa: E402
from elr_training.data.formats import SampleTransform, TransformedDataset, collate  # noqa: E402
from elr_training.data.synthetic import SyntheticScenes  # noqa: E402
from elr_training.models import Components, encode_batch_images, encode_prompts  # noqa: E402

ARMS = ("encode", "cached")


def build_components(name: str) -> Components:
    """SD 2.1's UNet, VAE and text encoder with random weights (seed 0), or the tiny-sd15 variant."""
    from diffusers import DDPMScheduler

    from elr_ext import tiny

    torch.manual_seed(0)
    if name == "tiny":
        from elr_training.models import tiny_components

        return tiny_components(0, "tiny-sd15")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from elr_ext.architectures import ARCHITECTURES

    arch = ARCHITECTURES[name]
    tokenizer = tiny.tiny_tokenizer()
    tokenizer.model_max_length = 77  # SD's 77 tokens: what the text encoder's cost depends on
    return Components(unet=UNet2DConditionModel(**arch.unet), text_encoder=CLIPTextModel(CLIPTextConfig(
        **arch.text_encoders[0])), tokenizer=tokenizer, noise_scheduler=DDPMScheduler(**arch.scheduler),
        vae=AutoencoderKL(**arch.vae), source=f"random {name}", family=name)


class Bench:
    """The stage, its optimiser, a raw batch and the same batch read back from a cache."""

    def __init__(self, args):
        from elr_training.stages import ControlStage

        self.resolution = args.resolution
        self.config, _ = make_config(ControlConfig, dict(
            max_train_steps=1, preset="paper", resolution=args.resolution, train_batch_size=args.batch,
            synthetic_size=args.batch, num_threads=0, cache_latents=tempfile.mkdtemp(prefix="cache_latents_")))
        self.components = build_components(args.config)
        self.stage = ControlStage(self.config, self.components, torch.device("cpu"), lambda *a: None)
        for part in (self.components.text_encoder, self.components.vae):
            part.requires_grad_(False).eval()
        self.params = [p for p in self.stage.adapter.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=self.config.learning_rate)
        maker = condition_maker_for(self.config)
        self.dataset = TransformedDataset(SyntheticScenes(args.batch, args.resolution, 0, 2),
                                          SampleTransform(args.resolution, maker))
        self.raw = collate([self.dataset[i] for i in range(args.batch)])
        self.cache = self._cache(maker)
        self.cached = self.cache.collate([self.cache[i] for i in range(args.batch)])
        self.generator = torch.Generator().manual_seed(0)

    def _cache(self, maker):
        """The batch encoded into a cache by the code train.py builds caches with, then read back."""
        folder = self.config.cache_latents
        atexit.register(shutil.rmtree, folder, True)  # a temporary folder
        layout = latent_cache._layout(self.config, self.components, self.dataset, maker, self.config.train_batch_size)
        encoders = latent_cache.Encoders(self.components.vae, self.components.tokenizers,
                                         self.components.text_encoders, torch.device("cpu"))
        latent_cache.encode_shard(folder, 0, self.dataset, layout, encoders, self.config.train_batch_size)
        latent_cache.write_empty_caption(folder, encoders)
        return latent_cache.LatentCache(folder, {"layout": layout})

    def set_encoders_aside(self) -> None:
        """What training from the cache does off the device: the VAE encoder freed, the text encoder gone."""
        latent_cache.free_vae_encoder(self.components.vae)
        self.components.text_encoder = None
        gc.collect()

    def step(self, batch) -> None:
        loss, _ = self.stage.loss(self.stage.adapter, batch, self.generator)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def arms(self) -> dict:
        return {"encode": lambda: self.step(self.raw), "cached": lambda: self.step(self.cached)}

    def parts(self) -> dict:
        c, device = self.components, torch.device("cpu")
        return {"vae encode": lambda: encode_batch_images(c, self.raw, device, self.generator),
                "text encode": lambda: encode_prompts(c, self.raw["captions"], device, self.raw),
                "draw from the cache": lambda: encode_batch_images(c, self.cached, device, self.generator),
                "read a sample: data + transform": lambda: self.dataset[0],
                "read a sample: cache": lambda: self.cache[0]}

    def weights(self) -> dict:
        c = self.components
        return {"vae_encoder_bytes": latent_cache.module_bytes(latent_cache.vae_encoder_modules(c.vae)),
                "vae_bytes": latent_cache.module_bytes([c.vae]),
                "text_encoder_bytes": latent_cache.module_bytes(c.text_encoders),
                "unet_bytes": latent_cache.module_bytes([c.unet]),
                "adapter_bytes": latent_cache.module_bytes([self.stage.adapter]),
                "cache_bytes_per_sample": sum(os.path.getsize(os.path.join(self.config.cache_latents, n))
                                              for n in os.listdir(self.config.cache_latents)
                                              if n.startswith("shard-")) / len(self.dataset)}


def memory_child(args) -> dict:
    """One arm in this fresh process: RSS after the set-up, and the peak of the measured steps over it."""
    if args.config != "tiny":  # the lazy imports and first-call allocations first, on the tiny models
        warm = Bench(parse_args(["--quick"]))
        warm.step(warm.cached if args.child == "cached" else warm.raw)
        del warm
        gc.collect()
    start = harness.process_memory_bytes()[1]
    bench = Bench(args)
    if args.child == "cached":
        bench.set_encoders_aside()
    batch = bench.cached if args.child == "cached" else bench.raw
    bench.step(batch)  # the first step allocates the optimiser's state
    gc.collect()
    before = harness.process_memory_bytes()[1]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := the current RSS
    for _ in range(args.steps):
        bench.step(batch)
    peak = harness.process_memory_bytes()[0]
    return {"arm": args.child, "resident_after_setup_bytes": before - start, "step_peak_bytes": peak - before,
            "peak_bytes": peak - start}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="sd21", choices=["sd21", "tiny"])
    p.add_argument("--resolution", type=int, default=None, help="image side in px (default 256; tiny 32)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="timed samples per arm (interleaved)")
    p.add_argument("--steps", type=int, default=2, help="steps measured for memory")
    p.add_argument("--quick", action="store_true", help="tiny-sd15 at 32 px, few repeats: a smoke run")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--out-dir", default=harness.RESULTS_DIR)
    p.add_argument("--child", default=None, choices=ARMS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.config, args.repeats = "tiny", 3
    args.resolution = args.resolution or (32 if args.config == "tiny" else 256)
    return args


def child_args(args, arm: str) -> list:
    return [os.path.abspath(__file__), "--child", arm, "--config", args.config, "--resolution",
            str(args.resolution), "--batch", str(args.batch), "--steps", str(args.steps)]


def format_table(result: dict) -> str:
    t, w, m = result["seconds"], result["weights"], result["memory"]
    mib = 2 ** 20
    lines = [f"cache_latents on {result['device']} (fp32, torch {result['torch']}); {result['description']}",
             f"timing: {result['timing']}; load average (1, 5, 15 min) at the start "
             f"{result.get('load_average_at_start', '-')}, before the timing {result['load_average_before']} (after "
             f"the memory processes), after it {result['load_average_after']}",
             "",
             f"{'step':44s} {'s/step':>9s}",
             f"{'with encoding (VAE + text encoder + step)':44s} {t['encode']:9.3f}",
             f"{'from the cache':44s} {t['cached']:9.3f}",
             f"{'saved per step':44s} {t['encode'] - t['cached']:9.3f}  "
             f"({(1 - t['cached'] / t['encode']) * 100:.1f} %)",
             "",
             f"{'part':44s} {'s':>9s}"]
    for name in ("vae encode", "text encode", "draw from the cache", "read a sample: data + transform",
                 "read a sample: cache"):
        lines.append(f"{name:44s} {t[name]:9.4f}")
    lines += ["", "weights off the device with the cache: VAE encoder "
              f"{w['vae_encoder_bytes'] / mib:.1f} MiB (of the VAE's {w['vae_bytes'] / mib:.1f}), text encoder "
              f"{w['text_encoder_bytes'] / mib:.1f} MiB: together "
              f"{(w['vae_encoder_bytes'] + w['text_encoder_bytes']) / mib:.1f} MiB (UNet {w['unet_bytes'] / mib:.1f}, "
              f"adapter {w['adapter_bytes'] / mib:.1f}); the cache holds {w['cache_bytes_per_sample'] / 1024:.1f} KiB "
              "per sample"]
    if m:
        def row(name, r):
            return (f"{name:44s} {r['resident_after_setup_bytes'] / mib:10.1f} MiB "
                    f"{r['step_peak_bytes'] / mib:6.1f} MiB {r['peak_bytes'] / mib:5.0f} MiB")

        lines += ["", f"{'memory (fresh process per arm, RSS)':44s} {'after set-up':>13s} {'step peak':>10s} "
                  f"{'peak':>9s}"]
        lines += [row(arm, m[arm]) for arm in ARMS if arm in m]
        if all(a in m for a in ARMS):
            lines.append(row("difference (encode - cached)", {k: m["encode"][k] - m["cached"][k] for k in
                                                              ("resident_after_setup_bytes", "step_peak_bytes",
                                                               "peak_bytes")}))
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(memory_child(args)), flush=True)
        return {}
    load_at_start = [round(x, 2) for x in os.getloadavg()]  # before this script's own processes
    memory = {}
    if not args.no_memory:  # first, each arm alone in a fresh process (before this one holds the models)
        for arm in ARMS:
            res = harness.run_fresh(child_args(args, arm), memory=True)
            if res:
                memory[arm] = res
                print(f"memory {arm}: {json.dumps(res)}", flush=True)
    load_before = [round(x, 2) for x in os.getloadavg()]
    bench = Bench(args)
    weights = bench.weights()
    device = torch.device("cpu")
    steps = harness.time_arms(bench.arms(), device, repeats=args.repeats, min_sample_s=0.0)
    parts = harness.time_arms(bench.parts(), device, repeats=max(args.repeats, 5), min_sample_s=0.2)
    load_after = [round(x, 2) for x in os.getloadavg()]
    side = args.resolution
    result = {
        "benchmark": "cache_latents", "config": args.config, "resolution": side, "batch": args.batch,
        "description": (f"{args.config}, batch {args.batch}, {side} px (latents {side // 8}x{side // 8}), canny, "
                        "kron adapter on the dense UNet, random weights" if args.config != "tiny" else
                        f"tiny-sd15, batch {args.batch}, {side} px"),
        "device": harness.device_name(device), "torch": torch.__version__, "python": platform.python_version(),
        "timing": f"interleaved, median of {args.repeats} steps per arm after 2 warm-up (parts: median of "
                  f"{max(args.repeats, 5)} samples of >= 0.2 s)",
        "load_average_at_start": load_at_start, "load_average_before": load_before, "load_average_after": load_after,
        "seconds": {**steps, **parts}, "weights": weights, "memory": memory,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": args.quick,
    }
    table = format_table(result)
    print(table, flush=True)
    stem = os.path.join(args.out_dir, f"cache_latents_cpu_{args.config}_{side}" + ("_quick" if args.quick else ""))
    harness.write_atomic(stem + ".json", json.dumps(result, indent=1))
    harness.write_atomic(stem + ".txt", table + "\n")
    print(f"wrote {stem}.json and .txt")
    return result


if __name__ == "__main__":
    main()
