"""Training and validation data for train.py: the synthetic scenes or one of the three on-disk formats
(formats.py), turned into tensors with their condition maps (conditions.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from typing import Optional

from torch.utils.data import DataLoader, Dataset

from .conditions import CONDITION_CHANNELS, ConditionDropout, ConditionMaker, ConditionSettings, condition_channels, given_map
from .formats import (
    CorruptImage,
    ImageFolderMetadata,
    SampleTransform,
    ShardedShuffleSampler,
    TransformedDataset,
    UniControlNetFolder,
    WebDatasetShards,
    batches_produced_by_worker,
    collate,
    read_map,
    resize_and_crop,
)
from .synthetic import SyntheticScenes

__all__ = [
    "TrainingData",
    "build_training_data",
    "build_validation_set",
    "condition_maker_for",
    "check_data_exists",
    "check_validation_pairs",
    "load_validation_pairs",
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


def condition_maker_for(config) -> Optional[ConditionMaker]:
    """The condition maps of a stage-2 configuration (--condition-types and their settings); None for
    the stages that train without conditions."""
    if not hasattr(config, "condition_types"):
        return None
    return ConditionMaker(config.condition_types, ConditionSettings(
        canny_low_threshold=config.canny_low_threshold, canny_high_threshold=config.canny_high_threshold,
        xdog_sigma=config.xdog_sigma, segmentation_model=config.segmentation_model))


def build_training_data(
    config, condition_maker: Optional[ConditionMaker], rank: int = 0, world_size: int = 1, cache=None
) -> TrainingData:
    """The training data loader; with `cache` (a data.cache.LatentCache, --cache-latents) the samples
    come from the cache, in the order the same sampler gives the data set it was made from."""
    fmt = detect_format(config.data) if config.data_format == "auto" else config.data_format
    if cache is not None:
        sampler = ShardedShuffleSampler(len(cache), config.train_batch_size, rank, world_size, config.seed)
        loader = DataLoader(cache, batch_size=config.train_batch_size, sampler=sampler,
                            num_workers=config.dataloader_num_workers, collate_fn=cache.collate, drop_last=True)
        return TrainingData(loader, cache, sampler, sampler.batches_per_epoch, f"{fmt}, from the cache {cache.folder}")
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
    dataset = TransformedDataset(raw_dataset(config, fmt, types), transform)
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


def raw_dataset(config, fmt: str, types) -> Dataset:
    """The map-style data set of a format (every format but the streamed webdataset shards), before the
    transform; also what a latent cache (data/cache.py) encodes."""
    if fmt == "synthetic":
        return SyntheticScenes(config.synthetic_size, config.resolution, config.seed, config.synthetic_max_shapes)
    if fmt == "unicontrolnet":
        return UniControlNetFolder(config.data, types)
    if fmt == "imagefolder":
        return ImageFolderMetadata(config.data, config.caption_column, types)
    raise ValueError(f"--data-format {fmt!r} unknown")


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


def validation_pair_lists(config) -> list:
    """--validation-image / --validation-prompt / --validation-condition-type as (image, prompt, type)
    triples, paired as diffusers' ControlNet scripts pair them: one each, one image for every prompt,
    or one prompt for every image; the type: one for all, one each, or the trained type when there is one."""
    images, prompts = list(config.validation_image or []), list(config.validation_prompt or [])
    if not images:
        if prompts or config.validation_condition_type:
            given = "--validation-prompt" if prompts else "--validation-condition-type"
            raise ValueError(f"{given} without --validation-image: give the condition images they go with")
        return []
    if not prompts:
        raise ValueError("--validation-image needs --validation-prompt (one prompt for all images, or one each)")
    if len(images) == len(prompts):
        pass
    elif len(images) == 1:
        images = images * len(prompts)
    elif len(prompts) == 1:
        prompts = prompts * len(images)
    else:
        raise ValueError(f"--validation-image has {len(images)} images and --validation-prompt {len(prompts)} "
                         "prompts: give one prompt, one image, or as many of each")
    types = list(config.validation_condition_type or [])
    if not types:
        if len(config.condition_types) > 1:
            raise ValueError(f"--validation-image: say which of --condition-types {list(config.condition_types)} "
                             "each image is with --validation-condition-type (one for all, or one each)")
        types = [config.condition_types[0]]
    if len(types) == 1:
        types = types * len(images)
    if len(types) != len(images):
        raise ValueError(f"--validation-condition-type has {len(types)} types for {len(images)} validation "
                         "images: give one for all, or one each")
    unknown = sorted({t for t in types if t not in config.condition_types})
    if unknown:
        raise ValueError(f"--validation-condition-type {unknown}: not among the trained --condition-types "
                         f"{list(config.condition_types)}")
    return list(zip(images, prompts, types))


def check_validation_pairs(config) -> None:
    """Every --validation-image exists and decodes, and the flags pair up (before any model is built)."""
    for path in dict.fromkeys(image for image, _, _ in validation_pair_lists(config)):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--validation-image {path}: no such file")
        try:
            read_map(path)
        except CorruptImage as error:
            raise ValueError(f"--validation-image {path}: cannot be decoded ({error})") from error


def load_validation_pairs(config) -> list:
    """The user's validation pairs as samples: {"conditions": [C, R, R] with the image's type filled in
    and the other types zero (as condition dropout leaves them), "caption", "type", "key": the file}.
    The image is resized and centre-cropped as training data is (nearest neighbour for seg maps)."""
    samples = []
    for path, prompt, kind in validation_pair_lists(config):
        condition = given_map(kind, resize_and_crop(read_map(path), config.resolution, nearest=(kind == "seg")))
        maps = [condition if t == kind else np.zeros((CONDITION_CHANNELS[t], *condition.shape[1:]), np.float32)
                for t in config.condition_types]
        samples.append({"conditions": torch.from_numpy(np.concatenate(maps)), "caption": prompt, "type": kind,
                        "key": path})
    return samples
