"""The data sets train.py reads, all yielding the same training samples.

(a) Uni-ControlNet's layout   root/anno.txt ("<id>\t<caption>" per line), root/images/<id>.jpg,
                              root/conditions/<type>/<id>.jpg (optional per type)
(b) imagefolder               root/metadata.jsonl, one JSON object per line: "file_name" (image path
                              relative to root), the caption column ("text" by default), and
                              optionally "<type>_file_name" for a given condition map (diffusers'
                              imagefolder convention); root/train/metadata.jsonl is accepted too
(c) webdataset shards         tar files as img2dataset writes them for LAION: members <key>.jpg
                              (or .png/.webp), <key>.txt (caption), <key>.json (metadata, unused
                              here), and optionally <key>.<type>.png condition maps; streamed, one
                              shard after the other, never unpacked to disk

A sample is turned into tensors by `SampleTransform`: the image is resized (shorter side to the
resolution, then centre-cropped), conditions given with it are resized the same way (nearest
neighbour for segmentation colours), missing ones computed (data/conditions.py).

An unreadable or corrupt image, or a corrupt shard, never stops training: the sample (or the rest
of the shard) is replaced by a `Skipped` marker that `collate` drops and counts, and the training
loop reports the counts (skipped_images, skipped_shards) in its log and metrics.json.
"""

from __future__ import annotations

import glob
import io
import json
import math
import os
import tarfile
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, Sampler, get_worker_info

from .conditions import ConditionMaker, MissingCondition

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass
class Skipped:
    """Stands in for a sample that could not be read."""

    kind: str  # "image" or "shard"
    where: str
    reason: str


class CorruptImage(ValueError):
    """An image that does not decode; `where` names the file (or shard member)."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where = where


def read_image(source, where: str = "") -> np.ndarray:
    """A path or bytes -> uint8 RGB [H, W, 3]; any decoding problem raises CorruptImage."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as image:
            image.load()  # decode now: a truncated file fails here, not later in a worker
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise CorruptImage(str(where or source), f"{type(error).__name__}: {error}") from error


def read_map(source, where: str = "") -> np.ndarray:
    """A condition map file -> uint8 [H, W] (greyscale) or [H, W, 3] (colour)."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as image:
            image.load()
            return np.asarray(image.convert("L" if image.mode in ("1", "L", "I", "F") else "RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise CorruptImage(str(where or source), f"{type(error).__name__}: {error}") from error


def resize_and_crop(image: np.ndarray, resolution: int, nearest: bool = False) -> np.ndarray:
    """Shorter side to `resolution` (area filter when shrinking, bicubic when growing), centre crop."""
    h, w = image.shape[:2]
    size = resized_size(h, w, resolution)
    if size != (h, w):
        resample = Image.NEAREST if nearest else (Image.BOX if resolution < min(h, w) else Image.BICUBIC)
        image = np.asarray(Image.fromarray(image).resize((size[1], size[0]), resample))
    top, left = crop_top_left(h, w, resolution)
    return image[top : top + resolution, left : left + resolution]


def resized_size(h: int, w: int, resolution: int) -> tuple:
    """(height, width) after the shorter side is scaled to `resolution`."""
    scale = resolution / min(h, w)
    if scale == 1.0:
        return h, w
    return max(resolution, round(h * scale)), max(resolution, round(w * scale))


def crop_top_left(h: int, w: int, resolution: int) -> tuple:
    """(top, left) of resize_and_crop's centre crop in the resized image: SDXL's crop micro-conditioning."""
    rh, rw = resized_size(h, w, resolution)
    return (rh - resolution) // 2, (rw - resolution) // 2


class SampleTransform:
    """Raw sample {"image", "caption", "conditions_given"} -> training sample:
    {"pixel_values": [3, R, R] in [-1, 1], "conditions": [C, R, R] in [0, 1], "caption": str,
    "original_size": (h, w) of the image as read, "crop_top_left": (top, left) of the crop} (the last
    two are SDXL's micro-conditioning)."""

    def __init__(self, resolution: int, conditions: Optional[ConditionMaker]):
        self.resolution, self.conditions = resolution, conditions

    def key(self) -> dict:
        """What the transform does to an image, for the key of a latent cache (data/cache.py): a flip or
        a random crop added here must show in it, so that a cache made without it is refused."""
        return {"resolution": self.resolution, "resize": "shorter side to the resolution (area filter when "
                "shrinking, bicubic when growing)", "crop": "centre", "flip": False}

    def __call__(self, raw: dict) -> dict:
        image = np.array(resize_and_crop(raw["image"], self.resolution))  # a writable copy
        sample = {
            "pixel_values": torch.from_numpy(np.ascontiguousarray(image))
            .permute(2, 0, 1)
            .float()
            .div(127.5)
            .sub(1.0),
            "caption": raw["caption"],
            "key": raw.get("key", ""),
            "original_size": tuple(raw["image"].shape[:2]),
            "crop_top_left": crop_top_left(*raw["image"].shape[:2], self.resolution),
        }
        if self.conditions is not None:
            given = {
                kind: resize_and_crop(m, self.resolution, nearest=(kind == "seg"))
                for kind, m in raw.get("conditions_given", {}).items()
                if kind in self.conditions.types
            }
            sample["conditions"] = torch.from_numpy(self.conditions(image, given))
        if "mask" in raw:
            sample["mask"] = torch.from_numpy(
                resize_and_crop(raw["mask"], self.resolution, nearest=True).astype(np.int64)
            )
        return sample


class TransformedDataset(Dataset):
    """A map-style raw data set with the transform applied; unreadable samples become `Skipped`."""

    def __init__(self, raw: Dataset, transform: SampleTransform):
        self.raw, self.transform = raw, transform

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, index: int):
        try:
            raw = self.raw[index]
            return raw if isinstance(raw, Skipped) else self.transform(raw)
        except (CorruptImage, MissingCondition) as error:
            return Skipped("image", getattr(error, "where", f"sample {index}"), str(error))


class UniControlNetFolder(Dataset):
    """Uni-ControlNet's layout (a): anno.txt, images/, conditions/<type>/."""

    def __init__(self, root: str, condition_types: Sequence[str] = ()):
        anno = os.path.join(root, "anno.txt")
        if not os.path.isfile(anno):
            raise FileNotFoundError(
                f"Uni-ControlNet data set {root}: missing {anno} ('<id>\\t<caption>' per line)"
            )
        self.root, self.condition_types = root, list(condition_types)
        self.items = []
        with open(anno, encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                if "\t" not in line:
                    raise ValueError(f"{anno}:{line_number}: expected '<id>\\t<caption>', got {line!r}")
                file_id, caption = line.split("\t", 1)
                self.items.append((file_id, caption))

    def __len__(self) -> int:
        return len(self.items)

    def _find(self, folder: str, file_id: str) -> Optional[str]:
        for ext in IMAGE_EXTENSIONS:
            path = os.path.join(folder, file_id + ext)
            if os.path.isfile(path):
                return path
        return None

    def __getitem__(self, index: int):
        file_id, caption = self.items[index]
        path = self._find(os.path.join(self.root, "images"), file_id)
        if path is None:
            return Skipped("image", os.path.join(self.root, "images", file_id + ".*"), "missing file")
        given = {}
        for kind in self.condition_types:
            map_path = self._find(os.path.join(self.root, "conditions", kind), file_id)
            if map_path is not None:
                given[kind] = read_map(map_path)
        return {"image": read_image(path), "caption": caption, "conditions_given": given, "key": file_id}


class ImageFolderMetadata(Dataset):
    """diffusers' imagefolder layout (b): metadata.jsonl beside the images."""

    def __init__(self, root: str, caption_column: str = "text", condition_types: Sequence[str] = ()):
        candidates = [os.path.join(root, "metadata.jsonl"), os.path.join(root, "train", "metadata.jsonl")]
        metadata = next((p for p in candidates if os.path.isfile(p)), None)
        if metadata is None:
            raise FileNotFoundError(f"imagefolder data set {root}: missing {candidates[0]}")
        self.folder = os.path.dirname(metadata)
        self.caption_column, self.condition_types = caption_column, list(condition_types)
        self.rows = []
        with open(metadata, encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                for key in ("file_name", caption_column):
                    if key not in row:
                        raise ValueError(
                            f"{metadata}:{line_number}: no {key!r} field (fields: {sorted(row)})"
                        )
                self.rows.append(row)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        row = self.rows[index]
        path = os.path.join(self.folder, row["file_name"])
        given = {
            kind: read_map(os.path.join(self.folder, row[f"{kind}_file_name"]))
            for kind in self.condition_types
            if row.get(f"{kind}_file_name")
        }
        return {
            "image": read_image(path),
            "caption": str(row[self.caption_column]),
            "conditions_given": given,
            "key": row["file_name"],
        }


def list_shards(spec: str) -> List[str]:
    """A folder (all *.tar in it), a glob, or a comma-separated list of tar paths, sorted."""
    if os.path.isdir(spec):
        shards = sorted(glob.glob(os.path.join(spec, "*.tar")))
    else:
        shards = []
        for part in spec.split(","):
            matched = sorted(glob.glob(part))
            shards.extend(matched if matched else [part])
    if not shards:
        raise FileNotFoundError(f"webdataset: no .tar shards found for {spec!r}")
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise FileNotFoundError(f"webdataset: shard(s) not found: {missing}")
    return shards


class WebDatasetShards(IterableDataset):
    """img2dataset tar shards (c), streamed with tarfile. Shards are split over processes (rank) and
    then over data-loader workers; their order is shuffled per epoch from the seed.

    Resuming: `start(epoch, items_to_skip_per_worker)` makes the next pass skip what each worker had
    already produced (markers included), so a resumed run continues at the same sample."""

    def __init__(
        self,
        spec: str,
        transform: SampleTransform,
        condition_types: Sequence[str] = (),
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ):
        self.shards = list_shards(spec)
        self.transform, self.condition_types = transform, list(condition_types)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch, self.skip_per_worker = 0, {}
        if len(self.shards) < world_size:
            raise ValueError(
                f"webdataset: {len(self.shards)} shard(s) cannot be split over {world_size} processes"
            )

    def start(self, epoch: int, skip_per_worker: Optional[dict] = None) -> None:
        self.epoch, self.skip_per_worker = epoch, dict(skip_per_worker or {})

    def _my_shards(self) -> tuple:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))
        mine = [self.shards[i] for i in order[self.rank :: self.world_size]]
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        return worker, mine[worker::workers]

    def __iter__(self) -> Iterator:
        worker, shards = self._my_shards()
        to_skip = self.skip_per_worker.get(worker, 0)
        for shard in shards:
            for item in self._read_shard(shard, skip=lambda: to_skip > 0):
                if to_skip > 0:
                    to_skip -= 1
                    continue
                yield item

    def _read_shard(self, shard: str, skip) -> Iterator:
        group, key = {}, None
        try:
            with tarfile.open(shard, mode="r|*") as tar:  # streaming: members in file order
                for member in tar:
                    if not member.isfile():
                        continue
                    name = os.path.basename(member.name)
                    member_key, _, suffix = name.partition(".")
                    if key is not None and member_key != key:
                        yield self._sample(shard, key, group, skip())
                        group = {}
                    key = member_key
                    group[suffix.lower()] = tar.extractfile(member).read()
            if key is not None:
                yield self._sample(shard, key, group, skip())
        except (tarfile.TarError, OSError, EOFError) as error:
            if key is not None and group:
                yield Skipped("image", f"{shard}:{key}", "cut off by the shard error below")
            yield Skipped("shard", shard, f"{type(error).__name__}: {error}")

    def _sample(self, shard: str, key: str, group: dict, skipping: bool):
        if skipping:  # resumed: counted, not decoded
            return None
        where = f"{shard}:{key}"
        image_suffix = next((s for s in ("jpg", "jpeg", "png", "webp") if s in group), None)
        if image_suffix is None:
            return Skipped("image", where, f"no image member (members: {sorted(group)})")
        try:
            given = {
                kind: read_map(group[f"{kind}.png"], f"{where}.{kind}.png")
                for kind in self.condition_types
                if f"{kind}.png" in group
            }
            raw = {
                "image": read_image(group[image_suffix], f"{where}.{image_suffix}"),
                "caption": group.get("txt", b"").decode("utf-8", errors="replace").strip(),
                "conditions_given": given,
                "key": where,
            }
            return self.transform(raw)
        except (CorruptImage, MissingCondition) as error:
            return Skipped("image", getattr(error, "where", where), str(error))


class ShardedShuffleSampler(Sampler):
    """Indices of one process for one epoch: a permutation seeded by (seed, epoch), cut to a multiple
    of world_size * batch_size (every process takes the same number of full batches), then every
    world_size-th index from `rank`. `start(epoch, batches_to_skip)` resumes inside an epoch."""

    def __init__(self, length: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.length, self.batch_size, self.rank, self.world_size, self.seed = (
            length,
            batch_size,
            rank,
            world_size,
            seed,
        )
        self.batches_per_epoch = length // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"data set of {length} samples is smaller than one global batch "
                f"({batch_size} x {world_size} processes)"
            )
        self.epoch, self.skip = 0, 0

    def start(self, epoch: int, batches_to_skip: int = 0) -> None:
        self.epoch, self.skip = epoch, batches_to_skip

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.skip) * self.batch_size

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.length)
        order = order[: self.batches_per_epoch * self.batch_size * self.world_size][
            self.rank :: self.world_size
        ]
        return iter(order[self.skip * self.batch_size :].tolist())


def collate(items: list) -> dict:
    """Stacks the readable samples; counts the Skipped markers (and the resume placeholders None)."""
    samples = [s for s in items if isinstance(s, dict)]
    skipped = [s for s in items if isinstance(s, Skipped)]
    batch = {"n": len(samples), "skipped": skipped, "items": len(items)}
    if samples:
        if "pixel_values" in samples[0]:  # a latent cache's samples (data/cache.py) may have none
            batch["pixel_values"] = torch.stack([s["pixel_values"] for s in samples])
        batch["captions"] = [s["caption"] for s in samples]
        batch["keys"] = [s["key"] for s in samples]
        if all("original_size" in s for s in samples):
            batch["original_sizes"] = torch.tensor([s["original_size"] for s in samples])
            batch["crops_top_left"] = torch.tensor([s["crop_top_left"] for s in samples])
        if "conditions" in samples[0]:
            batch["conditions"] = torch.stack([s["conditions"] for s in samples])
        if all("mask" in s for s in samples):
            batch["masks"] = torch.stack([s["mask"] for s in samples])
    return batch


def batches_produced_by_worker(batches_consumed: int, num_workers: int) -> dict:
    """With an IterableDataset, DataLoader takes batch i from worker i % num_workers: how many batches
    each worker had produced after `batches_consumed`."""
    workers = max(num_workers, 1)
    return {w: math.ceil(max(batches_consumed - w, 0) / workers) for w in range(workers)}
