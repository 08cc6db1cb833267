"""Training and validation data for train.py: the synthetic scenes or one of the three on-disk formats
(formats.py), turned into tensors with their condition maps (conditions.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from torch.utils.data import DataLoader, Dataset

from .conditions import ConditionDropout, ConditionMaker, ConditionSettings, condition_channels
from .formats import (
    ImageFolderMetadata,
    SampleTransform,
    ShardedShuffleSampler,
    TransformedDataset,
    UniControlNetFolder,
    WebDatasetShards,
    batches_produced_by_worker,
    collate,
)
from .synthetic import SyntheticScenes

__all__ = [
    "TrainingData",
    "build_training_data",
    "build_validation_set",
    "check_data_exists",
    "detect_format",
    "ConditionDropout",
    "ConditionMaker",
    "ConditionSettings",
    "condition_channels",
    "collate",
]

# The validation scenes come from another seed than the training scenes: never seen in training.
VALIDATION_SEED_OFFSET = 1_000_003


def check_data_exists(data: str) -> None:
    """--data names a file or folder that exists (shard patterns and URLs are checked when read)."""
    spec = any(mark in data for mark in ("*", ",", "{", "://", "pipe:"))
    if data != "synthetic" and not spec and not os.path.exists(data):
        raise FileNotFoundError(f"--data {data}: no such file or folder")


def detect_format(data: str) -> str:
    if data == "synthetic":
        return "synthetic"
    check_data_exists(data)
    if os.path.isfile(os.path.join(data, "anno.txt")):
        return "unicontrolnet"
    if os.path.isfile(os.path.join(data, "metadata.jsonl")) or os.path.isfile(
        os.path.join(data, "train", "metadata.jsonl")
    ):
        return "imagefolder"
    if (
        data.endswith(".tar")
        or "*" in data
        or "," in data
        or (os.path.isdir(data) and any(n.endswith(".tar") for n in os.listdir(data)))
    ):
        return "webdataset"
    raise ValueError(
        f"--data {data}: cannot tell its format (no anno.txt, no metadata.jsonl, no .tar shards); "
        f"give --data-format"
    )


@dataclass
class TrainingData:
    loader: DataLoader
    dataset: Dataset
    sampler: Optional[ShardedShuffleSampler]  # map-style data sets
    batches_per_epoch: Optional[int]  # None for streamed shards (unknown until read)
    format: str

    def start_epoch(self, epoch: int, batches_consumed: int = 0) -> None:
        """Position the data at (epoch, batch) — 0 for a fresh epoch, the saved position on resume."""
        if self.sampler is not None:
            self.sampler.start(epoch, batches_consumed)
        else:
            per_worker = batches_produced_by_worker(batches_consumed, self.loader.num_workers)
            self.dataset.start(epoch, {w: n * self.loader.batch_size for w, n in per_worker.items()})


def build_training_data(
    config, condition_maker: Optional[ConditionMaker], rank: int = 0, world_size: int = 1
) -> TrainingData:
    fmt = detect_format(config.data) if config.data_format == "auto" else config.data_format
    transform = SampleTransform(config.resolution, condition_maker)
    types = condition_maker.types if condition_maker is not None else []
    workers = config.dataloader_num_workers
    if fmt == "webdataset":
        dataset = WebDatasetShards(
            config.data, transform, types, rank=rank, world_size=world_size, seed=config.seed
        )
        loader = DataLoader(
            dataset, batch_size=config.train_batch_size, num_workers=workers, collate_fn=collate
        )
        return TrainingData(loader, dataset, None, None, fmt)
    if fmt == "synthetic":
        raw = SyntheticScenes(
            config.synthetic_size, config.resolution, config.seed, config.synthetic_max_shapes
        )
    elif fmt == "unicontrolnet":
        raw = UniControlNetFolder(config.data, types)
    elif fmt == "imagefolder":
        raw = ImageFolderMetadata(config.data, config.caption_column, types)
    else:
        raise ValueError(f"--data-format {fmt!r} unknown")
    dataset = TransformedDataset(raw, transform)
    sampler = ShardedShuffleSampler(len(dataset), config.train_batch_size, rank, world_size, config.seed)
    loader = DataLoader(
        dataset,
        batch_size=config.train_batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        drop_last=True,
    )
    return TrainingData(loader, dataset, sampler, sampler.batches_per_epoch, fmt)


def build_validation_set(config, condition_maker: Optional[ConditionMaker]) -> list:
    """The fixed validation samples: held-out synthetic scenes (with exact masks), or the first readable
    samples of the training data for the other formats."""
    transform = SampleTransform(config.resolution, condition_maker)
    n = config.num_validation_images
    if config.data == "synthetic" or config.data_format == "synthetic":
        raw = SyntheticScenes(
            n, config.resolution, config.seed + VALIDATION_SEED_OFFSET, config.synthetic_max_shapes
        )
        return [transform(raw[i]) for i in range(n)]
    data = build_training_data(config, condition_maker)
    data.start_epoch(0)
    samples = []
    for batch in data.loader:
        for i in range(batch["n"]):
            samples.append(
                {
                    "pixel_values": batch["pixel_values"][i],
                    "caption": batch["captions"][i],
                    "key": batch["keys"][i],
                    **({"conditions": batch["conditions"][i]} if "conditions" in batch else {}),
                }
            )
        if len(samples) >= n:
            break
    return samples[:n]
