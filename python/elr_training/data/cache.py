"""--cache-latents DIR: the training data encoded once by the frozen VAE encoder and text encoder(s),
then read back instead of encoding every step.

    DIR/manifest.json              what the cache was made for (its key), its layout, whether it is complete
    DIR/shard-00000.safetensors    SAMPLES_PER_SHARD samples each (the last one fewer), in data-set order
    DIR/empty_caption.safetensors  the text encoder output of "" (text dropout replaces a caption with it)

Per sample a shard holds
    latent_parameters   the VAE's latent distribution (mean and log-variance, `latent_dist.parameters`,
                        before the scaling factor), not a draw from it: training draws the latents from
                        it with the step's generator, exactly the draws it makes without the cache
                        (pixel_values instead in the tiny pixel-space model, which has no VAE)
    text_states         the UNet's encoder_hidden_states of the caption (encode_text)
    text_pooled         SDXL: the pooled embedding
    original_sizes, crops_top_left   SDXL's micro-conditioning (the time ids are made from them)
    conditions.<type>   stage 2's condition maps, uint8 when every value is k / 255 (Canny, given maps,
                        segmentation colours: lossless), float32 otherwise (XDoG sketches)
    valid               0 for a sample that could not be read when the cache was built (it stays skipped
                        and counted, as without the cache); its reason is in the shard's metadata
and in the metadata its key and caption.

The key: the cache format version, the transform (resolution, resize, crop, flip: SampleTransform.key),
the data (format, caption column, synthetic scenes' size / shapes / seed, the number of samples and a
checksum of the index: file names and captions), the condition types and the settings of each, the
dtype the frozen models run in (--mixed-precision), and the model: the VAE's and text encoders'
configs, a checksum of the VAE encoder's and the text encoders' weights (a strided sample of every
tensor) and of the tokenizers' vocabularies. The UNet is not in it: one cache serves every backbone.
A cache whose key differs is refused, naming each field that differs, before any training step (the
fields the configuration alone gives already before the models load); so is a partly built one made
for another key, since its shards would mix two runs' encodings: give another folder, or delete DIR.

Building writes each shard to <name>.tmp and renames it when complete, so an interrupted build
resumes on the next run, encoding only the shards that are missing (a leftover .tmp is overwritten).
Under several processes each encodes the missing shards i with i % world_size == rank, all wait, and
the main process checks every shard and marks the manifest complete.

Training from the cache: LatentCache is the map-style data set (the same sampler, the same order as
the data it was made from); models.encode_prompts and encode_batch_images take the cached encodings
from the batch. The encoders go to the device for the build only; afterwards the text encoders and
the VAE's encoder stay on the CPU (train.py's place_models), and visit the device while validation
encodes prompts or images (encoders_for_validation). A stage whose validation only decodes (stage 2)
frees the VAE's encoder (set_encoders_aside).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .conditions import CONDITION_CHANNELS
from .formats import SampleTransform, Skipped, TransformedDataset, collate

FLAG = "--cache-latents"
CACHE_VERSION = 1
MANIFEST = "manifest.json"
EMPTY_CAPTION = "empty_caption.safetensors"
SAMPLES_PER_SHARD = 256  # SD 2.1 at 512 px with one condition: about 0.7 MB a sample, 180 MB a shard
VAE_ENCODER_PARTS = ("encoder", "quant_conv")  # what AutoencoderKL.encode runs; decode runs the rest
CHECKSUM_VALUES = 4096  # values read per tensor for a weights checksum


class CacheError(ValueError):
    """A --cache-latents folder that this run cannot use; the message says why and what to do."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


# ------------------------------------------------------------------------------------------ the key


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


# config entries that say nothing about what a model computes (where it was read from, versions, dtypes)
_VOLATILE_CONFIG = {"architectures", "dtype", "torch_dtype", "transformers_version", "output_hidden_states",
                    "output_attentions", "return_dict", "name_or_path"}


def _config_key(config) -> dict:
    items = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return _jsonable({k: v for k, v in sorted(items.items()) if not k.startswith("_") and k not in _VOLATILE_CONFIG})


def weights_checksum(named_tensors) -> str:
    """A cheap, deterministic checksum of weights: every tensor's name and shape and CHECKSUM_VALUES
    evenly spaced values of it (as float32). Any fine-tune or replacement changes it; it reads a few
    kilobytes per tensor, not the whole model."""
    digest = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        flat = tensor.detach().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        if flat.numel():
            index = torch.linspace(0, flat.numel() - 1, min(flat.numel(), CHECKSUM_VALUES), dtype=torch.float64)
            digest.update(flat[index.long().to(flat.device)].to("cpu", torch.float32).numpy().tobytes())
    return digest.hexdigest()[:16]


def tokenizer_checksum(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    text = json.dumps([type(tokenizer).__name__, tokenizer.model_max_length, vocab])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def vae_encoder_tensors(vae) -> list:
    return [(k, v) for k, v in vae.state_dict().items() if k.split(".")[0] in VAE_ENCODER_PARTS]


def model_key(components) -> dict:
    """What the cached encodings depend on: the VAE (its encoder) and the text encoders with their tokenizers."""
    vae = components.vae
    return {
        "vae": None if vae is None else {"class": type(vae).__name__, "config": _config_key(vae.config),
                                         "encoder_weights": weights_checksum(vae_encoder_tensors(vae))},
        "text_encoders": [{"class": type(e).__name__, "config": _config_key(e.config),
                           "weights": weights_checksum(e.state_dict().items())} for e in components.text_encoders],
        "tokenizers": [tokenizer_checksum(t) for t in components.tokenizers],
    }


def conditions_key(maker) -> Optional[dict]:
    """The condition types and the settings that shape each (only those of the types trained)."""
    if maker is None:
        return None
    s, types = maker.settings, list(maker.types)
    key = {"types": types}
    if "canny" in types:
        key["canny"] = {"low_threshold": s.canny_low_threshold, "high_threshold": s.canny_high_threshold}
    if "sketch" in types:
        key["sketch"] = {"sigma": s.xdog_sigma, "k": s.xdog_k, "p": s.xdog_p, "eps": s.xdog_eps, "phi": s.xdog_phi}
    if "seg" in types:
        key["seg"] = {"segmentation_model": os.path.abspath(s.segmentation_model) if s.segmentation_model else None}
    return _jsonable(key)


def data_format_of(config) -> str:
    from . import detect_format

    return detect_format(config.data) if config.data_format == "auto" else config.data_format


def run_key(config) -> dict:
    """The part of the key the configuration alone gives: checked before any model is loaded."""
    from ..models import weight_dtype_of
    from . import condition_maker_for

    fmt = data_format_of(config)
    data = {"format": fmt}
    if fmt == "synthetic":
        data.update(size=config.synthetic_size, max_shapes=config.synthetic_max_shapes, seed=config.seed)
    if fmt == "imagefolder":
        data["caption_column"] = config.caption_column
    return _jsonable({
        "version": CACHE_VERSION,
        "transform": SampleTransform(config.resolution, None).key(),
        "data": data,
        "conditions": conditions_key(condition_maker_for(config)),
        "dtype": str(weight_dtype_of(config.mixed_precision)).replace("torch.", ""),
    })


def index_checksum(raw) -> Optional[str]:
    """The data set's index (file names, captions, condition files) as a checksum; None for the synthetic
    scenes, which the seed, size and shape count determine. The images are not read: an image replaced
    under the same name is not noticed (delete the cache then)."""
    rows = getattr(raw, "items", None)
    if rows is None:
        rows = getattr(raw, "rows", None)
    if rows is None:
        return None
    return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()[:16]


def full_key(config, components, dataset: TransformedDataset) -> dict:
    return {**run_key(config), "model": model_key(components),
            "samples": {"count": len(dataset), "index": index_checksum(dataset.raw)}}


def _flatten(value, prefix=""):
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
        return out or {prefix: {}}
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        out = {f"{prefix}.count": len(value)}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}.{i}"))
        return out
    return {prefix: value}


def differences(made_for: dict, this_run: dict, fields: Optional[Sequence[str]] = None) -> List[str]:
    """What differs between a cache's key and this run's, one phrase per field (the top-level `fields`
    only, when given)."""
    fields = list(this_run) if fields is None else list(fields)
    theirs = _flatten({k: made_for.get(k) for k in fields})
    ours = _flatten({k: this_run.get(k) for k in fields})
    other_types = _types(made_for.get("conditions")) != _types(this_run.get("conditions"))
    phrases, said = [], set()
    order = lambda p: (fields.index(p.split(".")[0]), not p.endswith(".count"), p)  # noqa: E731  (counts first)
    for path in sorted(set(theirs) | set(ours), key=order):
        a, b = theirs.get(path, "(absent)"), ours.get(path, "(absent)")
        if a == b:
            continue
        parts = path.split(".")
        group = ".".join(parts[:2]) if parts[0] == "model" else path  # one phrase per model part
        if parts[0] == "conditions" and other_types:  # other types: their settings need no phrase of their own
            group, path = "conditions", "conditions"
            a, b = made_for.get("conditions"), this_run.get("conditions")
        if group in said:
            continue
        said.add(group)
        phrases.append(_phrase(path, a, b))
    return phrases


def _phrase(path: str, a, b) -> str:
    if path == "transform.resolution":
        return f"made for resolution {a}, this run trains at {b}"
    if path == "dtype":
        return f"made with the frozen models in {a}, this run has them in {b} (--mixed-precision)"
    if path in ("conditions", "conditions.types"):
        return f"made for condition types {_types(a)}, this run uses {_types(b)} (--condition-types)"
    if path.startswith("conditions."):
        return f"made with {path[len('conditions.'):]} = {a}, this run has {b}"
    if path == "samples.count":
        return f"made for {a} samples, this run's data has {b}"
    if path == "samples.index":
        return "made for another list of files and captions (the data's index differs)"
    if path.startswith("model."):
        return _model_phrase(path.split(".")[1:], a, b)
    if path == "version":
        return f"written in cache format {a}, this code reads format {b}"
    if path.startswith("data."):
        return f"made for data {path[len('data.'):]} {a}, this run has {b}"
    if path.startswith("transform."):
        return f"made with the transform's {path[len('transform.'):]} {a}, this run has {b}"
    return f"{path}: made for {a}, this run has {b}"


def _model_phrase(parts: List[str], a, b) -> str:
    """A phrase for the first difference found in the VAE, the text encoders or the tokenizers."""
    part, rest = parts[0], parts[1:]
    if part == "vae":
        if not rest or a in (None, "(absent)") or b in (None, "(absent)"):
            return f"made with {'no VAE' if a in (None, '(absent)') else 'a VAE'}, this run has " \
                   f"{'none (pixel space)' if b in (None, '(absent)') else 'one'}"
        if rest[0] == "encoder_weights":
            return "made with another VAE than this run's (the weights of its encoder differ)"
        return f"made with another VAE than this run's (its {'.'.join(rest)}: {a} vs {b})"
    if part == "text_encoders":
        if rest == ["count"]:
            return f"made with {a} text encoder(s), this run has {b}"
        which = f"text encoder {int(rest[0]) + 1}"
        if rest[1:] == ["weights"]:
            return f"made with other text encoder(s) than this run's (the weights of {which} differ)"
        return f"made with other text encoder(s) than this run's ({which}'s {'.'.join(rest[1:])}: {a} vs {b})"
    return "made with other tokenizer(s) than this run's (their vocabularies or lengths differ)"


def _types(key) -> str:
    if isinstance(key, dict):
        key = key.get("types")
    return "none (a stage without conditions)" if key in (None, "(absent)") else str(key)


# ------------------------------------------------------------------------------------------ the folder


def read_manifest(folder: str) -> Optional[dict]:
    """The folder's manifest, None when there is none; a damaged one is a CacheError."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        for name in ("key", "layout", "complete"):
            if name not in manifest:
                raise ValueError(f"no {name!r} in it")
        for name in ("samples_per_shard", "num_samples", "num_shards", "latents"):
            if name not in manifest["layout"]:
                raise ValueError(f"no layout.{name!r} in it")
    except (OSError, ValueError, TypeError, AttributeError) as error:
        raise CacheError(f"{FLAG} {folder}: {path} cannot be read ({error}); delete {folder} to build the cache "
                         f"anew, or give another {FLAG} folder") from error
    return manifest


def _write_json(path: str, value: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


def shards_on_disk(folder: str) -> List[str]:
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "shard-*.safetensors")))


def _mismatch(folder: str, manifest: dict, phrases: List[str]) -> CacheError:
    layout = manifest["layout"]
    if manifest.get("complete"):
        what = f"complete, {layout['num_samples']} samples"
    else:
        what = f"partly built: {len(shards_on_disk(folder))} of {layout['num_shards']} shards"
    source = (manifest.get("about") or {}).get("model")
    if source and any(p.startswith(("made with another VAE", "made with other text", "made with other tok"))
                      for p in phrases):
        what += f", from the model {source}"
    return CacheError(f"{FLAG} {folder}: the cache there ({what}) was made for another run: {'; '.join(phrases)}. "
                      f"Give another {FLAG} folder, or delete {folder} to build it anew for this run")


def check_cache_flag(config) -> None:
    """Before any model is built: the data has an index to cache, the folder is usable, and an existing
    cache's key agrees with this configuration in what the configuration alone gives."""
    fmt = data_format_of(config)
    if fmt == "webdataset":
        raise ValueError(f"{FLAG} needs a data set with an index (synthetic, unicontrolnet or imagefolder); --data "
                         f"{config.data} is webdataset shards, which are streamed without one: train without "
                         f"{FLAG}, or write the data as an imagefolder (metadata.jsonl)")
    folder = config.cache_latents
    if not folder:
        raise ValueError(f"{FLAG} needs a folder")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise CacheError(f"{FLAG} {folder}: is a file, not a folder")
    if config.plan:  # a plan reads no data
        return
    manifest = read_manifest(folder)
    if manifest is not None:
        ours = run_key(config)
        phrases = differences(manifest["key"], ours, fields=list(ours))
        if phrases:
            raise _mismatch(folder, manifest, phrases)


def shard_damage(path: str, rows: int, layout: dict, size: Optional[int] = None) -> Optional[str]:
    """Why a shard cannot be read (its header, its tensors' rows, its metadata), or None. Cheap: the
    header only (safetensors checks that the file holds every byte it lists)."""
    from safetensors import safe_open

    try:
        if size is not None and os.path.getsize(path) != size:
            return f"{os.path.getsize(path)} bytes, the manifest says {size}"
        with safe_open(path, framework="pt") as f:
            names, metadata = set(f.keys()), f.metadata() or {}
            needed = [layout["latents"], "text_states", "original_sizes", "crops_top_left", "valid"]
            needed += ["text_pooled"] if layout.get("pooled") else []
            needed += [f"conditions.{t}" for t in layout.get("conditions") or []]
            for name in needed:
                if name not in names:
                    return f"no tensor {name!r}"
                shape = f.get_slice(name).get_shape()
                if not shape or shape[0] != rows:
                    return f"{name} has {shape[0] if shape else 0} rows, expected {rows}"
        for name in ("keys", "captions", "skipped"):
            if len(json.loads(metadata.get(name, "null")) or []) != rows:
                return f"its metadata {name!r} does not list {rows} samples"
    except Exception as error:  # safetensors raises its own SafetensorError for a damaged file
        return f"{type(error).__name__}: {error}"
    return None


@dataclass
class CacheState:
    manifest: Optional[dict]
    done: List[int]  # shards complete and readable

    @property
    def complete(self) -> bool:
        m = self.manifest
        return bool(m and m["complete"] and len(self.done) == m["layout"]["num_shards"])


def inspect_cache(folder: str, key: dict) -> CacheState:
    """The state of `folder` for a run with `key`: nothing yet, partly built or complete; a cache made for
    another key, a damaged manifest or a damaged shard is a CacheError saying what to do."""
    manifest = read_manifest(folder)
    if manifest is None:
        stray = shards_on_disk(folder) if os.path.isdir(folder) else []
        if stray:
            raise CacheError(f"{FLAG} {folder}: holds {len(stray)} shard file(s) but no {MANIFEST}, so what they "
                             f"were made for is unknown; delete {folder} or give another {FLAG} folder")
        return CacheState(None, [])
    phrases = differences(manifest["key"], key)
    if phrases:
        raise _mismatch(folder, manifest, phrases)
    layout, sizes = manifest["layout"], manifest.get("shards") or {}
    done = []
    for i in range(layout["num_shards"]):
        path = os.path.join(folder, shard_name(i))
        if not os.path.isfile(path):
            continue
        problem = shard_damage(path, shard_rows(layout, i), layout, sizes.get(shard_name(i)))
        if problem:
            raise CacheError(f"{FLAG} {folder}: {shard_name(i)} is damaged ({problem}); delete that file and run "
                             "again, which encodes it anew (the other shards are kept)")
        done.append(i)
    if manifest["complete"] and len(done) == layout["num_shards"]:
        empty = os.path.join(folder, EMPTY_CAPTION)
        try:
            from safetensors.torch import load_file

            load_file(empty)
        except Exception as error:  # noqa: BLE001 - missing or damaged: written again by a build
            manifest = dict(manifest, complete=False)
            del error
    return CacheState(manifest, done)


def shard_rows(layout: dict, index: int) -> int:
    per = layout["samples_per_shard"]
    return min(per, layout["num_samples"] - index * per)


# ------------------------------------------------------------------------------------------ building


@dataclass
class Encoders:
    """What building a cache runs: the frozen VAE (None in pixel space), the tokenizers and text encoders,
    on `device`, under `autocast` (the run's mixed precision, as training runs them)."""

    vae: Optional[nn.Module]
    tokenizers: list
    text_encoders: list
    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    @torch.no_grad()
    def images(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return pixels
        with self.autocast():
            return self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist.parameters

    @torch.no_grad()
    def text(self, captions: List[str]):
        from elr_ext.pipelines.prompts import encode_text

        with self.autocast():
            return encode_text(self.tokenizers, self.text_encoders, captions, self.device)


def encode_shard(folder: str, index: int, dataset: Dataset, layout: dict, encoders: Encoders, batch_size: int,
                 num_workers: int = 0) -> str:
    """Encode shard `index` of `dataset` and write it (through <name>.tmp and a rename); returns its path."""
    from safetensors.torch import save_file

    start = index * layout["samples_per_shard"]
    rows = list(range(start, start + shard_rows(layout, index)))
    loader = DataLoader(Subset(dataset, rows), batch_size=batch_size, num_workers=num_workers, collate_fn=list)
    per_row: List[Optional[dict]] = []
    for items in loader:
        valid = [s for s in items if isinstance(s, dict)]
        encoded = iter(())
        if valid:
            latents = encoders.images(torch.stack([s["pixel_values"] for s in valid]))
            text = encoders.text([s["caption"] for s in valid])
            encoded = iter([{"latents": latents[i].cpu(), "states": text.states[i].cpu(),
                             "pooled": None if text.pooled is None else text.pooled[i].cpu()}
                            for i in range(len(valid))])
        for item in items:
            per_row.append(dict(next(encoded), sample=item) if isinstance(item, dict) else {"skipped": item})
    template = next((r for r in per_row if "sample" in r), None)
    if template is None:  # not one readable sample: the shapes from a blank image and caption
        blank = torch.zeros(3, layout["resolution"], layout["resolution"])
        text = encoders.text([""])
        template = {"latents": encoders.images(blank[None])[0].cpu(), "states": text.states[0].cpu(),
                    "pooled": None if text.pooled is None else text.pooled[0].cpu(),
                    "sample": {"conditions": torch.zeros(layout["channels"], *blank.shape[1:])}}

    def column(name):
        return torch.stack([r[name] if "sample" in r else torch.zeros_like(template[name]) for r in per_row])

    tensors = {layout["latents"]: column("latents"), "text_states": column("states"),
               "valid": torch.tensor([1 if "sample" in r else 0 for r in per_row], dtype=torch.uint8),
               "original_sizes": torch.tensor([list(r["sample"]["original_size"]) if "sample" in r else [0, 0]
                                               for r in per_row], dtype=torch.int64),
               "crops_top_left": torch.tensor([list(r["sample"]["crop_top_left"]) if "sample" in r else [0, 0]
                                               for r in per_row], dtype=torch.int64)}
    if layout.get("pooled"):
        tensors["text_pooled"] = column("pooled")
    if layout.get("conditions"):
        maps = torch.stack([r["sample"]["conditions"] if "sample" in r else
                            torch.zeros_like(template["sample"]["conditions"]) for r in per_row])
        channel = 0
        for kind in layout["conditions"]:
            part = maps[:, channel:channel + CONDITION_CHANNELS[kind]].contiguous()
            channel += CONDITION_CHANNELS[kind]
            tensors[f"conditions.{kind}"] = to_stored_map(part)
    metadata = {
        "keys": json.dumps([r["sample"]["key"] if "sample" in r else r["skipped"].where for r in per_row]),
        "captions": json.dumps([r["sample"]["caption"] if "sample" in r else "" for r in per_row]),
        "skipped": json.dumps([None if "sample" in r else [r["skipped"].kind, r["skipped"].where,
                                                           r["skipped"].reason] for r in per_row]),
        "first_sample": str(start),
    }
    path = os.path.join(folder, shard_name(index))
    tmp = path + ".tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)
    return path


def to_stored_map(maps: torch.Tensor) -> torch.Tensor:
    """Condition maps as uint8 when that is lossless (every value k / 255, which given maps, Canny edges
    and segmentation colours are), else as they are (float32: XDoG sketches take any value)."""
    quantised = (maps * 255).round().clamp(0, 255).to(torch.uint8)
    return quantised if torch.equal(quantised.float() / 255, maps) else maps.float()


def from_stored_map(stored: torch.Tensor) -> torch.Tensor:
    return stored.float() / 255 if stored.dtype == torch.uint8 else stored


def write_empty_caption(folder: str, encoders: Encoders) -> None:
    from safetensors.torch import save_file

    text = encoders.text([""])
    tensors = {"text_states": text.states.cpu().contiguous()}
    if text.pooled is not None:
        tensors["text_pooled"] = text.pooled.cpu().contiguous()
    path = os.path.join(folder, EMPTY_CAPTION)
    save_file(tensors, path + ".tmp")
    os.replace(path + ".tmp", path)


def _layout(config, components, dataset, condition_maker, samples_per_shard: int) -> dict:
    n = len(dataset)
    return {"samples_per_shard": samples_per_shard, "num_samples": n,
            "num_shards": max(1, -(-n // samples_per_shard)), "resolution": config.resolution,
            "latents": "pixel_values" if components.vae is None else "latent_parameters",
            "pooled": components.text_encoder_2 is not None,
            "conditions": list(condition_maker.types) if condition_maker is not None else [],
            "channels": condition_maker.channels if condition_maker is not None else 0}


@contextlib.contextmanager
def _on(modules, device, dtype):
    """`modules` on `device` in `dtype` for the block, back on the CPU after it."""
    for m in modules:
        m.to(device)
        if dtype != torch.float32:  # as place_models casts the frozen models
            m.to(dtype=dtype)
    try:
        yield
    finally:
        for m in modules:
            m.to("cpu")
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


def prepare_cache(config, components, condition_maker, device, say=print, rank: int = 0, world_size: int = 1,
                  wait: Callable[[], None] = lambda: None,
                  autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> "LatentCache":
    """The run's latent cache, built first where it is missing or incomplete (every process calls this;
    `wait` is the barrier between them). The encoders go to `device` for the build only."""
    from ..models import weight_dtype_of
    from . import raw_dataset

    folder = config.cache_latents
    types = condition_maker.types if condition_maker is not None else []
    dataset = TransformedDataset(raw_dataset(config, data_format_of(config), types),
                                 SampleTransform(config.resolution, condition_maker))
    key = full_key(config, components, dataset)
    state = inspect_cache(folder, key)  # in every process, before any of them writes: the same verdict in all
    wait()
    if state.complete:
        layout = state.manifest["layout"]
        say(f"cache {folder}: complete ({layout['num_samples']} samples in {layout['num_shards']} shards), reusing")
        return LatentCache(folder, state.manifest)

    layout = state.manifest["layout"] if state.manifest else _layout(config, components, dataset, condition_maker,
                                                                     SAMPLES_PER_SHARD)
    missing = [i for i in range(layout["num_shards"]) if i not in state.done]
    if state.manifest is None:
        say(f"cache {folder}: building {layout['num_samples']} samples in {layout['num_shards']} shards")
    else:
        say(f"cache {folder}: resuming: {len(state.done)} of {layout['num_shards']} shards done")
    manifest = {"version": CACHE_VERSION, "key": key, "layout": layout, "complete": False,
                "about": {"model": components.source, "data": os.path.abspath(config.data)
                          if config.data != "synthetic" else "synthetic",
                          "created": time.strftime("%Y-%m-%d %H:%M:%S")}}
    os.makedirs(folder, exist_ok=True)
    if rank == 0 and (state.manifest is None or state.manifest["complete"]):  # incomplete until the end
        previous = state.manifest or manifest
        _write_json(os.path.join(folder, MANIFEST), {k: v for k, v in previous.items() if k != "shards"}
                    | {"complete": False})
    started = time.perf_counter()
    encoders = Encoders(components.vae, components.tokenizers, components.text_encoders, device, autocast)
    dtype = weight_dtype_of(config.mixed_precision)
    modules = [*components.text_encoders] + ([components.vae] if components.vae is not None else [])
    for module in modules:
        module.requires_grad_(False).eval()
    mine = [i for i in missing if i % world_size == rank]
    with _on(modules, device, dtype):
        for done, index in enumerate(mine, 1):
            encode_shard(folder, index, dataset, layout, encoders, config.train_batch_size,
                         config.dataloader_num_workers)
            if done == len(mine) or done % 10 == 0:
                say(f"cache {folder}: {done} of {len(mine)} shards encoded"
                    + (" by this process" if world_size > 1 else ""))
        if rank == 0:
            write_empty_caption(folder, encoders)
    wait()
    if rank == 0 and len(inspect_cache(folder, key).done) == layout["num_shards"]:
        previous = state.manifest or manifest
        _write_json(os.path.join(folder, MANIFEST), dict(
            previous, complete=True, build_seconds=round(time.perf_counter() - started, 1),
            shards={shard_name(i): os.path.getsize(os.path.join(folder, shard_name(i)))
                    for i in range(layout["num_shards"])}))
    wait()
    state = inspect_cache(folder, key)  # every process: the same verdict, no process left waiting
    if not state.complete:
        raise CacheError(f"{FLAG} {folder}: after the build {len(state.done)} of {layout['num_shards']} shards "
                         "are there; run again to encode the rest")
    total = sum(state.manifest["shards"].values())
    say(f"cache {folder}: complete, {layout['num_samples']} samples, {total / 2**20:.1f} MiB")
    return LatentCache(folder, state.manifest)


# ------------------------------------------------------------------------------------------ reading


@dataclass
class CachedText:
    """A batch's cached text encodings and the empty caption's: what encode_prompts takes instead of running
    the text encoders. `captions` are the batch's captions as cached; a caption emptied by text dropout
    takes the empty caption's embedding."""

    captions: List[str]
    states: torch.Tensor
    pooled: Optional[torch.Tensor]
    empty_states: torch.Tensor
    empty_pooled: Optional[torch.Tensor]

    def select(self, captions: Sequence[str], device):
        from elr_ext.pipelines.prompts import TextStates

        rows = []
        for i, caption in enumerate(captions):
            if caption == self.captions[i]:
                rows.append(i)
            elif caption == "":
                rows.append(None)
            else:
                raise ValueError(f"{FLAG}: caption {i} of the batch is {caption!r}; the cache holds the encodings of "
                                 f"{self.captions[i]!r} and of the empty caption only")

        def pick(cached, empty):
            return torch.stack([cached[i] if i is not None else empty[0] for i in rows]).to(device)

        pooled = None if self.pooled is None else pick(self.pooled, self.empty_pooled)
        return TextStates(pick(self.states, self.empty_states), pooled)


class LatentCache(Dataset):
    """A complete cache as a map-style data set: sample i is the i-th sample of the data set it was made
    from (the training sampler's indices mean the same), or the Skipped marker it was."""

    MAX_OPEN = 16  # shards kept open (memory-mapped) at a time, per process

    def __init__(self, folder: str, manifest: dict):
        from safetensors.torch import load_file

        self.folder, self.manifest, self.layout = folder, manifest, manifest["layout"]
        empty = load_file(os.path.join(folder, EMPTY_CAPTION))
        self.empty_states, self.empty_pooled = empty["text_states"], empty.get("text_pooled")
        self._open: "OrderedDict[int, object]" = OrderedDict()
        self._metadata: Dict[int, dict] = {}

    def __getstate__(self):  # data-loader workers open their own shards
        return {**self.__dict__, "_open": OrderedDict()}

    def __len__(self) -> int:
        return self.layout["num_samples"]

    def _shard(self, index: int):
        from safetensors import safe_open

        if index in self._open:
            self._open.move_to_end(index)
            return self._open[index]
        handle = safe_open(os.path.join(self.folder, shard_name(index)), framework="pt")
        self._open[index] = handle
        if len(self._open) > self.MAX_OPEN:
            self._open.popitem(last=False)
        if index not in self._metadata:
            self._metadata[index] = {k: json.loads(v) for k, v in handle.metadata().items() if k != "first_sample"}
        return handle

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        index, row = divmod(i, self.layout["samples_per_shard"])
        shard = self._shard(index)
        meta = self._metadata[index]
        if meta["skipped"][row] is not None:
            kind, where, reason = meta["skipped"][row]
            return Skipped(kind, where, reason)

        def read(name):
            return shard.get_slice(name)[row:row + 1][0]

        sample = {"caption": meta["captions"][row], "key": meta["keys"][row],
                  "original_size": tuple(read("original_sizes").tolist()),
                  "crop_top_left": tuple(read("crops_top_left").tolist()),
                  "text_states": read("text_states")}
        latents = read(self.layout["latents"])
        sample["pixel_values" if self.layout["latents"] == "pixel_values" else "latent_parameters"] = latents
        if self.layout.get("pooled"):
            sample["text_pooled"] = read("text_pooled")
        if self.layout.get("conditions"):
            sample["conditions"] = torch.cat([from_stored_map(read(f"conditions.{t}"))
                                              for t in self.layout["conditions"]])
        return sample

    def collate(self, items: list) -> dict:
        """formats.collate's batch, with the cached encodings: latent_parameters, cached_text, image_size."""
        batch = collate(items)
        samples = [s for s in items if isinstance(s, dict)]
        if samples:
            if "latent_parameters" in samples[0]:
                batch["latent_parameters"] = torch.stack([s["latent_parameters"] for s in samples])
            pooled = torch.stack([s["text_pooled"] for s in samples]) if "text_pooled" in samples[0] else None
            batch["cached_text"] = CachedText([s["caption"] for s in samples],
                                              torch.stack([s["text_states"] for s in samples]), pooled,
                                              self.empty_states, self.empty_pooled)
            batch["image_size"] = (self.layout["resolution"], self.layout["resolution"])
        return batch


# ------------------------------------------------------------------------------------------ the encoders


class FreedEncoder(nn.Module):
    """Stands in for a VAE encoder that --cache-latents freed: calling it says so."""

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"the VAE's encoder was freed after {FLAG} built its cache (this stage encodes no "
                           "images after it); nothing should encode images in this run")


def module_bytes(modules) -> int:
    return sum(p.numel() * p.element_size() for m in modules if m is not None
               for p in list(m.parameters()) + list(m.buffers()))


def vae_encoder_modules(vae) -> list:
    return [getattr(vae, name) for name in VAE_ENCODER_PARTS
            if isinstance(getattr(vae, name, None), nn.Module) and not isinstance(getattr(vae, name), FreedEncoder)]


def free_vae_encoder(vae) -> int:
    """Drop the VAE's encoder and quant_conv (decoding needs neither); returns the bytes they held."""
    freed = module_bytes(vae_encoder_modules(vae))
    vae.encoder = FreedEncoder()
    vae.quant_conv = None
    return freed


def encoders_of(components) -> list:
    """The modules --cache-latents keeps off the training device: the text encoders and, while it is
    there, the VAE's encoder."""
    return [*components.text_encoders] + (vae_encoder_modules(components.vae) if components.vae is not None else [])


def set_encoders_aside(components, keep_vae_encoder: bool, say=print) -> None:
    """Once the cache is there: the VAE's encoder freed when the stage never encodes images again (stage 2
    validates by sampling and decoding only), else kept like the text encoders, which stay on the CPU
    (train.py's place_models leaves them there, encoders_for_validation takes them to the device)."""
    kept = f"the text encoder(s) ({module_bytes(components.text_encoders) / 2**20:.1f} MiB)"
    vae = components.vae
    if vae is not None and not keep_vae_encoder:
        say(f"{FLAG}: the VAE's encoder freed ({free_vae_encoder(vae) / 2**20:.1f} MiB; this stage only decodes); "
            f"{kept} stay on the CPU, on the device during validation only")
        return
    if vae is not None:
        kept += f" and the VAE's encoder ({module_bytes(vae_encoder_modules(vae)) / 2**20:.1f} MiB)"
    say(f"{FLAG}: {kept} stay on the CPU, on the device during validation only")


def place_vae_decoder(vae, device) -> None:
    """Everything of the VAE but its encoder on `device` (what decoding runs)."""
    for name, child in vae.named_children():
        if name not in VAE_ENCODER_PARTS:
            child.to(device)


@contextlib.contextmanager
def encoders_for_validation(components, device, enabled: bool = True):
    """With --cache-latents the text encoders (and the VAE encoder, where the stage kept it) live on the
    CPU; validation encodes prompts (and, in stage 1, images), so they visit `device` for its duration."""
    modules = encoders_of(components) if enabled else []
    on_cpu = [m for m in modules if next(m.parameters()).device.type == "cpu" and torch.device(device).type != "cpu"]
    for m in on_cpu:
        m.to(device)
    try:
        yield
    finally:
        for m in on_cpu:
            m.to("cpu")
        if on_cpu and torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
