"""The training application's data, conditions and metrics (python/elr_training)."""

import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))

from elr_training.data import build_training_data, collate  # noqa: E402
from elr_training.data.conditions import ConditionDropout, ConditionMaker, xdog_map  # noqa: E402
from elr_training.data.formats import (  # noqa: E402
    SampleTransform,
    WebDatasetShards,
    batches_produced_by_worker,
    read_image,
)
from elr_training.data.synthetic import SHAPE_KINDS, SyntheticScenes, render_scene  # noqa: E402
from elr_training.metrics import canny_edges, edge_nmse, segmentation_iou  # noqa: E402


def _square_image(size=32, lo=20, hi=220):
    image = np.full((size, size, 3), lo, np.uint8)
    image[8:24, 10:22] = hi
    return image


def test_edge_nmse_zero_on_own_edges_one_on_blank_image():
    image = _square_image()
    edges = canny_edges(image)
    assert edges.any()
    assert edge_nmse(image, edges) == 0.0
    assert edge_nmse(image, (edges > 0).astype(np.int64)) == 0.0  # {0, 1} maps are read as such
    assert edge_nmse(np.full_like(image, 90), edges) == 1.0  # no edges at all: every target pixel missed
    # floats in [0, 1] and CHW tensors are the same image
    chw = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    assert edge_nmse(chw, edges) == 0.0


def test_edge_nmse_counts_misses_and_false_edges():
    image = _square_image()
    edges = (canny_edges(image) > 0).astype(np.float64)
    shifted = np.roll(image, 3, axis=1)  # same square 3 px to the right: a few edges overlap
    gen = (canny_edges(shifted) > 0).astype(np.float64)
    expected = np.mean((gen - edges) ** 2) / np.mean(edges**2)
    assert edge_nmse(shifted, edges) == pytest.approx(expected)
    assert expected > 1.0
    assert np.isnan(edge_nmse(image, np.zeros((32, 32), np.uint8)))
    with pytest.raises(ValueError, match="condition_edges is 16x16"):
        edge_nmse(image, np.zeros((16, 16), np.uint8))


def test_segmentation_iou_by_hand():
    true = np.array([[0, 0, 1, 1], [0, 0, 1, 1]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 1, 2]])
    # class 0: inter 3, union 4; class 1: inter 3, union 5; class 2: inter 0, union 1; class 3 absent
    assert segmentation_iou(pred, true, num_classes=4) == pytest.approx((3 / 4 + 3 / 5 + 0) / 3)
    assert segmentation_iou(true, true, num_classes=2) == 1.0
    assert segmentation_iou(torch.from_numpy(pred), torch.from_numpy(true), 4) == pytest.approx(0.45)
    with pytest.raises(ValueError, match="pred_mask holds ids outside"):
        segmentation_iou(pred, true, num_classes=2)
    ignored = true.copy()
    ignored[:, 1] = 255
    # column 1 left out: class 0 inter 2 union 2, class 1 inter 3 union 4, class 2 inter 0 union 1
    assert segmentation_iou(pred, ignored, num_classes=4, ignore_index=255) == pytest.approx(
        (1 + 3 / 4 + 0) / 3
    )


# --------------------------------------------------------------------------- synthetic scenes, conditions


def test_synthetic_scenes_are_deterministic_and_exact():
    a, b = SyntheticScenes(8, 32, seed=3), SyntheticScenes(8, 32, seed=3)
    for i in range(8):
        x, y = a[i], b[i]
        assert np.array_equal(x["image"], y["image"]) and x["caption"] == y["caption"]
        # every shape named in the caption is in the mask with its class id, and nothing else is
        kinds = {k for k in SHAPE_KINDS if f" {k}" in x["caption"]}
        assert set(np.unique(x["mask"])) - {0} == {1 + SHAPE_KINDS.index(k) for k in kinds}
        # the mask is exact: inside it the image has the shapes' colours, outside the background colour
        background = x["image"][x["mask"] == 0]
        assert (background == background[0]).all()
        # the edge map is Canny of the clean render, so the metric scores the data itself 0
        assert edge_nmse(x["image"], canny_edges(x["image"])) == 0.0
    assert not np.array_equal(a[0]["image"], SyntheticScenes(8, 32, seed=4)[0]["image"])
    assert len({a[i]["caption"] for i in range(8)}) > 4


def test_condition_maker_channels_and_given_maps():
    image, mask, _ = render_scene(0, 1, 32)
    maker = ConditionMaker(["canny", "sketch", "seg"])
    seg = np.zeros((32, 32, 3), np.uint8)
    seg[mask > 0] = (255, 0, 0)
    out = maker(image, {"seg": seg})
    assert out.shape == (5, 32, 32) and out.dtype == np.float32
    assert np.array_equal(out[0] > 0, canny_edges(image) > 0)
    assert np.array_equal(out[2], (mask > 0).astype(np.float32))  # red channel of the given map
    # XDoG lines lie on the outlines: near Canny's edges, not inside the flat regions
    lines = xdog_map(image)[0] > 0.5
    assert lines.any()
    near_edges = cv2_dilate(canny_edges(image) > 0)
    assert lines[~near_edges].sum() <= 0.05 * lines.sum()
    with pytest.raises(ValueError, match="unknown"):
        ConditionMaker(["depth"])


def cv2_dilate(mask):
    import cv2

    return cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0  # within 2 px


def test_condition_dropout_matches_uni_controlnet_probabilities():
    n = 20000
    dropout = ConditionDropout()  # drop text 0.5, keep all 0.1, drop all 0.1, drop each 0.5
    captions, conditions = dropout(
        ["a"] * n, torch.ones(n, 4, 2, 2), ["canny", "seg"], torch.Generator().manual_seed(0)
    )
    text_dropped = np.mean([c == "" for c in captions])
    canny_kept = conditions[:, 0, 0, 0].numpy() > 0
    seg_kept = conditions[:, 1:4, 0, 0].numpy() > 0
    assert (seg_kept == seg_kept[:, :1]).all()  # a condition's channels are dropped together
    seg_kept = seg_kept[:, 0]
    assert abs(text_dropped - 0.5) < 0.02
    assert abs(canny_kept.mean() - (0.1 + 0.8 * 0.5)) < 0.02
    assert abs((canny_kept & seg_kept).mean() - (0.1 + 0.8 * 0.25)) < 0.02
    assert abs((~canny_kept & ~seg_kept).mean() - (0.1 + 0.8 * 0.25)) < 0.02
    # one condition type: dropped with drop_all only, not in half of the steps
    _, alone = dropout(["a"] * n, torch.ones(n, 1, 2, 2), ["canny"], torch.Generator().manual_seed(1))
    assert abs((alone[:, 0, 0, 0] > 0).float().mean().item() - 0.9) < 0.01
    with pytest.raises(ValueError, match="keep_all \\+ drop_all"):
        ConditionDropout(keep_all=0.6, drop_all=0.6)


# --------------------------------------------------------------------------- the three on-disk formats
def _png(image):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _scenes(n, resolution=24):
    return [render_scene(7, i, resolution) for i in range(n)]


CORRUPT = b"\x89PNG\r\n\x1a\n this is not an image"


def _write_unicontrolnet(root, scenes):
    (root / "images").mkdir(parents=True)
    (root / "conditions" / "canny").mkdir(parents=True)
    lines = []
    for i, (image, _, caption) in enumerate(scenes):
        (root / "images" / f"{i:04d}.png").write_bytes(_png(image))
        lines.append(f"{i:04d}\t{caption}")
    (root / "images" / "bad.png").write_bytes(CORRUPT)
    lines.append("bad\ta corrupt picture")
    given = np.zeros((24, 24), np.uint8)
    given[5, :] = 255  # a given map differs from what Canny would find: it must be the one used
    (root / "conditions" / "canny" / "0000.png").write_bytes(_png(given))
    (root / "anno.txt").write_text("\n".join(lines) + "\n")
    return given


def _write_imagefolder(root, scenes):
    root.mkdir(parents=True)
    rows = []
    for i, (image, _, caption) in enumerate(scenes):
        (root / f"{i}.png").write_bytes(_png(image))
        rows.append({"file_name": f"{i}.png", "text": caption})
    (root / "bad.png").write_bytes(CORRUPT)
    rows.insert(1, {"file_name": "bad.png", "text": "a corrupt picture"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def _write_shard(path, members):
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _write_webdataset(root, scenes):
    root.mkdir(parents=True)

    def members(items, start):
        out = []
        for k, (image, _, caption) in enumerate(items):
            key = f"{start + k:09d}"
            out += [
                (f"{key}.jpg", _png(image)),
                (f"{key}.txt", caption.encode()),
                (f"{key}.json", json.dumps({"key": key}).encode()),
            ]
        return out

    _write_shard(root / "00000.tar", members(scenes[:3], 0))
    second = members(scenes[3:5], 3)
    second[0:1] = [("000000003.jpg", CORRUPT)]  # a corrupt image inside a good shard
    _write_shard(root / "00001.tar", second)
    (root / "00002.tar").write_bytes(b"\x00garbage that is not a tar archive" * 40)  # a corrupt shard


def _drain(data):
    data.start_epoch(0)
    samples, skipped = [], []
    for batch in data.loader:
        samples += batch.get("keys", [])
        skipped += batch["skipped"]
    return samples, skipped


def _config(**overrides):
    from elr_training.config import ControlConfig, make_config

    values = dict(stage=2, resolution=16, train_batch_size=1, synthetic_size=8, max_train_steps=1, seed=0)
    values.update(overrides)
    return make_config(ControlConfig, values)[0]


def test_unicontrolnet_layout_reads_given_maps_and_skips_a_corrupt_image(tmp_path):
    given = _write_unicontrolnet(tmp_path / "uni", _scenes(3))
    config = _config(data=str(tmp_path / "uni"))
    data = build_training_data(config, ConditionMaker(["canny"]))
    assert data.format == "unicontrolnet" and data.batches_per_epoch == 4
    samples, skipped = _drain(data)
    assert sorted(samples) == ["0000", "0001", "0002"]
    assert [s.kind for s in skipped] == ["image"] and "bad" in skipped[0].where
    from PIL import Image

    sample = data.dataset[0]  # id 0000 has a given canny map: it is read (resized), not computed
    expected = np.asarray(Image.fromarray(given).resize((16, 16), Image.BOX)) / 255.0
    assert np.allclose(sample["conditions"][0].numpy(), expected, atol=1 / 255)


def test_imagefolder_metadata_skips_a_corrupt_image(tmp_path):
    _write_imagefolder(tmp_path / "folder", _scenes(3))
    data = build_training_data(_config(data=str(tmp_path / "folder")), ConditionMaker(["canny", "sketch"]))
    assert data.format == "imagefolder"
    samples, skipped = _drain(data)
    assert sorted(samples) == ["0.png", "1.png", "2.png"] and [s.kind for s in skipped] == ["image"]
    batch = collate([data.dataset[0], data.dataset[2]])
    assert batch["conditions"].shape == (2, 2, 16, 16) and batch["pixel_values"].shape == (2, 3, 16, 16)


def test_webdataset_shards_stream_and_skip_corrupt_image_and_shard(tmp_path):
    _write_webdataset(tmp_path / "shards", _scenes(5))
    data = build_training_data(
        _config(data=str(tmp_path / "shards"), train_batch_size=2), ConditionMaker(["canny"])
    )
    assert data.format == "webdataset" and data.batches_per_epoch is None
    samples, skipped = _drain(data)
    assert len(samples) == 4  # 3 + (2 - the corrupt one)
    assert sorted(s.kind for s in skipped) == ["image", "shard"]
    assert any(s.where.endswith("00002.tar") for s in skipped if s.kind == "shard")
    # a shard cut off in the middle: the samples before the cut are kept, the rest counted
    whole = (tmp_path / "shards" / "00000.tar").read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "00000.tar").write_bytes(whole[: len(whole) * 2 // 3])
    cut = build_training_data(_config(data=str(tmp_path / "cut"), data_format="webdataset"), None)
    samples, skipped = _drain(cut)
    assert 1 <= len(samples) < 3 and "shard" in {s.kind for s in skipped}


def test_webdataset_resume_skips_what_each_worker_produced(tmp_path):
    _write_webdataset(tmp_path / "shards", _scenes(5))
    transform = SampleTransform(16, None)
    dataset = WebDatasetShards(str(tmp_path / "shards"), transform, seed=0)
    everything = [s["key"] if isinstance(s, dict) else s.where for s in dataset]
    dataset.start(0, {0: 3})
    rest = [s["key"] if isinstance(s, dict) else s.where for s in dataset]
    assert rest == everything[3:]
    assert batches_produced_by_worker(5, 2) == {0: 3, 1: 2}


def test_corrupt_image_error_names_the_file(tmp_path):
    from elr_training.data.formats import CorruptImage

    bad = tmp_path / "x.jpg"
    bad.write_bytes(CORRUPT)
    with pytest.raises(CorruptImage, match="x.jpg"):
        read_image(str(bad))


def test_training_on_shards_counts_skipped_data(tmp_path):
    import train  # python/train.py

    _write_webdataset(tmp_path / "shards", _scenes(5))
    metrics = train.main(
        [
            "--stage",
            "0",
            "--data",
            str(tmp_path / "shards"),
            "--output-dir",
            str(tmp_path / "run"),
            "--num-train-epochs",
            "1",
            "--resolution",
            "16",
            "--train-batch-size",
            "2",
            "--num-validation-images",
            "2",
            "--num-inference-steps",
            "2",
        ]
    )
    assert (metrics["skipped_images"], metrics["skipped_shards"]) == (1, 1)
    assert metrics["global_step"] == 3  # 4 readable samples + 2 markers in batches of 2


def test_segmentation_from_a_local_model_or_skipped_without_one(tmp_path):
    """Images without a given mask: a segmentation model the user points to predicts one (colour-coded
    by its class ids); without a model the sample is skipped and counted, not a crash."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    from elr_training.data.conditions import ConditionSettings

    model_dir = tmp_path / "segformer"
    config = SegformerConfig(
        num_encoder_blocks=1,
        depths=[1],
        sr_ratios=[1],
        hidden_sizes=[8],
        patch_sizes=[3],
        strides=[2],
        num_attention_heads=[1],
        mlp_ratios=[2],
        decoder_hidden_size=8,
        num_labels=5,
    )
    SegformerForSemanticSegmentation(config).save_pretrained(model_dir)
    SegformerImageProcessor(size={"height": 32, "width": 32}).save_pretrained(model_dir)
    image, _, _ = render_scene(0, 0, 32)
    maker = ConditionMaker(["seg"], ConditionSettings(segmentation_model=str(model_dir)))
    seg = maker(image, {})
    assert seg.shape == (3, 32, 32) and 0.0 <= seg.min() and seg.max() <= 1.0
    palette = {tuple(c) for c in maker._segmenter.palette.astype(np.float32) / 255}
    assert all(tuple(seg[:, y, x]) in palette for y in range(0, 32, 7) for x in range(0, 32, 7))

    _write_imagefolder(tmp_path / "folder", _scenes(2))
    data = build_training_data(_config(data=str(tmp_path / "folder")), ConditionMaker(["seg"]))
    samples, skipped = _drain(data)
    assert samples == [] and len(skipped) == 3  # 2 without a mask or a model, 1 corrupt
    assert sum("no --segmentation-model" in s.reason for s in skipped) == 2
