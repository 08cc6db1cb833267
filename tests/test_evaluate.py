"""Evaluation (python/evaluate.py, python/elr_training/evaluation.py) and the training-step benchmark
(benchmarks/train_step.py): metrics on inputs with known answers, FID / CLIP only with real weights
(reported unavailable with a reason otherwise), and both scripts end to end on a minimal
configuration, checking the structure of what they write."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))

from elr_training import evaluation, metrics  # noqa: E402
from elr_training.data.synthetic import SyntheticScenes  # noqa: E402
from elr_training.data.conditions import canny_map  # noqa: E402


def _scenes(n=4, resolution=32):
    data = SyntheticScenes(size=n, resolution=resolution, seed=int(torch.randint(0, 10_000, ()).item()))
    return [data[i] for i in range(n)]


# ---------------------------------------------------------------------------------------------
# controllability metrics


def test_edge_nmse_zero_on_identical_edges_positive_when_shifted():
    scenes = _scenes()
    images = [s["image"] for s in scenes]
    edges = [canny_map(im)[0] for im in images]
    same = metrics.mean_edge_nmse(images, edges)
    assert same["available"] and same["value"] == 0.0 and same["num_samples"] == len(images)
    shifted = metrics.mean_edge_nmse([np.roll(im, 3, axis=1) for im in images], edges)
    assert shifted["value"] > 0.1
    blank = metrics.mean_edge_nmse([np.full_like(im, 128) for im in images], edges)
    assert blank["value"] == pytest.approx(1.0)  # no edges at all: every condition edge missed


def test_edge_nmse_unavailable_without_condition_edges():
    image = np.zeros((32, 32, 3), np.uint8)
    res = metrics.mean_edge_nmse([image], [np.zeros((32, 32), np.uint8)])
    assert not res["available"] and res["value"] is None and "edge" in res["reason"]


def test_edge_f_score_forgives_a_one_pixel_shift_that_nmse_counts():
    scenes = _scenes()
    images = [s["image"] for s in scenes]
    edges = [canny_map(im)[0] for im in images]
    same = metrics.mean_edge_f_score(images, edges)
    assert same["available"] and same["value"] == 1.0 and same["max_distance_px"] == 1.5
    one = [np.roll(im, 1, axis=1) for im in images]
    # NMSE counts the shifted outline twice; F matches every pixel within 1.5 px (but the rolled-in column)
    assert metrics.mean_edge_nmse(one, edges)["value"] > 0.5
    assert metrics.mean_edge_f_score(one, edges)["value"] > 0.9
    far = metrics.mean_edge_f_score([np.roll(im, 4, axis=1) for im in images], edges)["value"]
    assert far < 0.5
    blank = metrics.mean_edge_f_score([np.full_like(im, 128) for im in images], edges)
    assert blank["value"] == 0.0  # no generated edges: recall 0


def test_edge_f_score_matching_is_one_to_one_and_maximum():
    from scipy.optimize import linear_sum_assignment

    from elr_training.metrics import edge_f_score, match_edge_pixels

    # a 2-px wide generated line over a 1-px condition line: only half the generated pixels can match
    cond = np.zeros((16, 16), np.uint8)
    cond[8, 2:14] = 1
    thick = np.zeros((16, 16), bool)
    thick[8:10, 2:14] = True
    assert match_edge_pixels(thick, cond.astype(bool), 1.5) == (12, 24, 12)
    # random maps: the count equals the maximum matching found by an exhaustive assignment
    rng = np.random.default_rng(0)
    for trial in range(20):
        a, b = rng.random((12, 12)) < 0.2, rng.random((12, 12)) < 0.2
        tol = [1.0, 1.5, 2.0][trial % 3]
        ya, xa = np.nonzero(a)
        yb, xb = np.nonzero(b)
        near = (ya[:, None] - yb[None]) ** 2 + (xa[:, None] - xb[None]) ** 2 <= tol * tol
        r, c = linear_sum_assignment(-near.astype(float))
        assert match_edge_pixels(a, b, tol)[0] == int(near[r, c].sum())
    image = np.zeros((16, 16, 3), np.uint8)
    image[4:12, 4:12] = 255
    d = edge_f_score(image, canny_map(image)[0], details=True)
    assert d["f_score"] == d["precision"] == d["recall"] == 1.0 and d["matched"] == d["condition_pixels"] > 0
    assert np.isnan(edge_f_score(image, np.zeros((16, 16), np.uint8)))  # no condition edge: undefined
    with pytest.raises(ValueError, match="max_distance"):
        edge_f_score(image, cond, max_distance=-1)
    with pytest.raises(ValueError, match="edge_f_score: generated image is 16x16 but condition_edges is 8x8"):
        edge_f_score(image, np.zeros((8, 8), np.uint8))


def test_segmentation_iou_one_on_the_data_lower_when_shifted():
    scenes = _scenes()
    pairs = [metrics.segment_like_reference(s["image"], s["image"], s["mask"]) for s in scenes]
    res = metrics.mean_segmentation_iou([p for p, _ in pairs], [t for _, t in pairs], 5)
    # not exactly 1: anti-aliased shape edges and classes of near colours can take a neighbour's class
    assert res["available"] and res["value"] > 0.9
    same = res["value"]
    pairs = [metrics.segment_like_reference(np.roll(s["image"], 4, axis=0), s["image"], s["mask"]) for s in scenes]
    res = metrics.mean_segmentation_iou([p for p, _ in pairs], [t for _, t in pairs], 5)
    assert 0.0 < res["value"] < same


def test_segment_like_reference_merges_classes_of_one_colour():
    image = np.zeros((8, 8, 3), np.uint8)
    mask = np.zeros((8, 8), np.int64)
    image[:4, :4] = image[4:, 4:] = (200, 0, 0)  # two shapes of different classes, same colour
    mask[:4, :4], mask[4:, 4:] = 1, 2
    pred, true = metrics.segment_like_reference(image, image, mask)
    assert set(np.unique(true)) == {0, 1} and np.array_equal(pred, true)


def test_palette_segmentation_nearest_colour():
    palette = np.array([(0, 0, 0), (255, 0, 0), (0, 0, 255)])
    image = np.array([[(10, 5, 0), (240, 20, 10)], [(0, 30, 200), (130, 0, 0)]], np.uint8)
    assert metrics.palette_segmentation(image, palette).tolist() == [[0, 1], [2, 1]]


# ---------------------------------------------------------------------------------------------
# FID and CLIP score: never from random weights unless the caller hands weights over


def test_fid_and_clip_unavailable_without_weights(tmp_path):
    images = [s["image"] for s in _scenes(3)]
    for res in (metrics.frechet_inception_distance(images, images, None),
                metrics.frechet_inception_distance(images, images, str(tmp_path / "missing.pth")),
                metrics.clip_score(images, ["a red circle"] * 3, None),
                metrics.clip_score(images, ["a red circle"] * 3, str(tmp_path / "no-clip"))):
        assert res["available"] is False and res["value"] is None and res["reason"]
    assert "Inception" in metrics.frechet_inception_distance(images, images, None)["reason"]
    assert evaluation.format_value(metrics.unavailable("x")) == "n/a"


def test_clip_score_with_a_local_folder(tmp_path):
    """The code path with a CLIP folder, here a tiny random CLIP written locally: the number itself
    means nothing; what is checked is that a given folder is read and scored, prompts and images."""
    pytest.importorskip("torchmetrics")
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from elr_ext.tiny import tiny_tokenizer

    folder = str(tmp_path / "clip")
    tokenizer = tiny_tokenizer(folder)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, max_position_embeddings=32, eos_token_id=tokenizer.eos_token_id,
                bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                  patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    scenes = _scenes(3)
    images = [s["image"] for s in scenes]
    res = metrics.clip_score(images, [s["caption"] for s in scenes], folder)
    assert res["available"] and 0.0 <= res["value"] <= 1.0 and res["against"] == "prompt"
    assert res["clip_s_hessel"] == pytest.approx(2.5 * res["value"])
    sketch = metrics.clip_score(images, images, folder)  # an image against itself: cosine 1
    assert sketch["against"] == "image" and sketch["value"] == pytest.approx(1.0, abs=1e-4)


# ---------------------------------------------------------------------------------------------
# tables


def test_table2_layout_and_delta():
    columns = {"Uni-ControlNet": {"trainable_params": 1000, "edge_nmse": metrics.measured(0.6),
                                  "fid": metrics.unavailable("no weights")},
               "ELR": {"trainable_params": 400, "edge_nmse": metrics.measured(0.5),
                       "fid": metrics.unavailable("no weights")}}
    table = evaluation.table2_markdown(columns, delta=("Uni-ControlNet", "ELR"))
    lines = table.strip().splitlines()
    assert lines[0].startswith("|  | Metric | Uni-ControlNet | ELR | Δ")
    edge = next(line for line in lines if "Edge Maps" in line)
    assert "0.600" in edge and "0.500" in edge and "-0.100" in edge
    assert "n/a" in next(line for line in lines if "FID" in line)
    assert not any("Memory" in line for line in lines)  # rows no column has are left out


# ---------------------------------------------------------------------------------------------
# the scripts end to end, minimal configuration


def _run(args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    res = subprocess.run([sys.executable] + args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert res.returncode == 0, f"{' '.join(args)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def test_train_step_quick_writes_every_arm(tmp_path):
    out = _run(["benchmarks/train_step.py", "--quick", "--out-dir", str(tmp_path), "--memory-jobs", "2"])
    assert "target trainable_params" in out
    stem = tmp_path / "train_step_cpu_tiny_b1_s16_quick"
    result = json.loads((stem.with_suffix(".json")).read_text())
    assert (stem.with_suffix(".txt")).read_text().startswith("train_step on")
    assert (stem.with_suffix(".png")).stat().st_size > 0
    rows = {r["arm"]: r for r in result["rows"]}
    assert list(rows) == ["baseline", "kron", "fused-fdn", "decomposed", "elr"]
    for arm, row in rows.items():
        for key in ("trainable_params", "total_params", "backbone_params", "peak_memory_bytes"):
            assert isinstance(row[key], int) and row[key] > 0, (arm, key, row[key])
        assert row["seconds_per_iteration"] > 0
        assert set(row["ratios"]) == {"trainable_params", "peak_memory_bytes", "seconds_per_iteration"}
    assert rows["baseline"]["ratios"]["trainable_params"] == 1.0
    # what each saving changes, and what it must leave alone
    base = rows["baseline"]
    assert rows["kron"]["trainable_params"] < base["trainable_params"]
    assert rows["fused-fdn"]["trainable_params"] == base["trainable_params"]
    assert rows["fused-fdn"]["total_params"] == base["total_params"]
    assert rows["decomposed"]["backbone_params"] < base["backbone_params"]
    assert rows["elr"]["backbone_params"] == rows["decomposed"]["backbone_params"]
    targets = rows["elr"]["targets"]
    assert set(targets) == {"trainable_params", "peak_memory_bytes", "seconds_per_iteration"}
    assert all(isinstance(t["met"], bool) and t["ratio"] > 0 for t in targets.values())


@pytest.fixture(scope="module")
def stage2_run(tmp_path_factory):
    """A stage-2 run of train.py (stages 0, 1, 2 chained), one optimiser step each: what evaluate.py reads."""
    run = tmp_path_factory.mktemp("run") / "stage2"
    _run(["python/train.py", "--stage", "2", "--output-dir", str(run), "--earlier-stage-steps", "1", "1",
          "--max-train-steps", "1", "--synthetic-size", "8", "--train-batch-size", "2", "--num-validation-images", "2",
          "--num-inference-steps", "1", "--condition-types", "canny", "seg", "--checkpointing-steps", "1"])
    return run


def test_evaluate_run_and_checkpoint(stage2_run, tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "python"))
    import evaluate

    common = ["--num-samples", "2", "--steps", "2"]
    result = evaluate.main(["--run", str(stage2_run), "--output-dir", str(tmp_path / "run")] + common)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    assert metrics["condition_types"] == ["canny", "seg"] and metrics["num_samples"] == 2
    assert metrics["edge_nmse"]["available"] and metrics["edge_nmse"]["value"] >= 0.0
    assert metrics["edge_nmse_data"]["value"] == 0.0  # the synthetic edge maps are Canny of the data itself
    assert 0.0 <= metrics["segmentation_iou"]["value"] <= 1.0
    for key in ("fid", "clip_score"):
        assert metrics[key]["available"] is False and metrics[key]["reason"]
    assert metrics["sketch_clip_score"]["reason"] == "the adapter takes no sketch condition"
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    table = (tmp_path / "run" / "table.md").read_text()
    for row in ("Edge Maps (NMSE ↓)", "Segmentation Maps (IoU ↑)", "FID ↓", "# Params. ↓ (trainable)"):
        assert row in table
    from PIL import Image

    grid = Image.open(tmp_path / "run" / "grid.png")
    # data, canny map, from canny, seg map, from seg: five 32-px images scaled to 128 px, 2 px apart
    assert grid.size[0] == 5 * 128 + 6 * 2
    # The last checkpoint holds the final weights: evaluated from it, the same numbers.
    checkpoint = stage2_run / "checkpoints" / "checkpoint-1"
    again = evaluate.main(["--checkpoint", str(checkpoint), "--output-dir", str(tmp_path / "ckpt")] + common)
    assert again["model"]["checkpoint"] == str(checkpoint)
    assert again["metrics"]["edge_nmse"]["value"] == result["metrics"]["edge_nmse"]["value"]
    assert again["metrics"]["segmentation_iou"]["value"] == result["metrics"]["segmentation_iou"]["value"]


def test_controllability_verdicts():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import controllability

    def column(nmse, iou):
        return {"edge_nmse": metrics.measured(nmse), "segmentation_iou": metrics.measured(iou)}

    names = ("no control", "Uni-ControlNet-style (full)", "ELR Stage II (kron)")
    good = controllability.verdicts(dict(zip(names, (column(1.0, 0.3), column(0.5, 0.7), column(0.54, 0.66)))))
    assert good["edge_nmse"]["met"] and good["segmentation_iou"]["met"]
    worse = controllability.verdicts(dict(zip(names, (column(1.0, 0.3), column(0.5, 0.7), column(0.6, 0.6)))))
    assert not worse["edge_nmse"]["within_10pct_of_baseline"] and not worse["segmentation_iou"]["met"]
    useless = controllability.verdicts(dict(zip(names, (column(1.0, 0.3), column(0.95, 0.32), column(0.96, 0.31)))))
    assert useless["edge_nmse"]["within_10pct_of_baseline"] and not useless["edge_nmse"]["met"]
    missing = controllability.verdicts({n: {"edge_nmse": metrics.unavailable("x"),
                                            "segmentation_iou": metrics.unavailable("x")} for n in names})
    assert missing["edge_nmse"]["met"] is None
