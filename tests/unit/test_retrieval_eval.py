"""Retrieval Recall@k: a hand-computed case, CLIP_benchmark's formula on random features, and the CLI end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cliplab.eval.retrieval import retrieval_metrics


def test_constructed_case_by_hand():
    """3 images x 2 captions in 3-d: chosen cosine similarities, recall values counted by hand."""
    images = np.eye(3, dtype=np.float32)
    # caption j belongs to image j // 2; each caption vector is normalised, its scores = its coordinates
    texts = np.array([
        [0.9, 0.1, 0.0],   # img0 caption: best img0 -> hit@1
        [0.1, 0.8, 0.2],   # img0 caption: img1 > img2 > img0 -> rank 3
        [0.2, 0.7, 0.1],   # img1 caption: img1 first -> hit@1
        [0.6, 0.3, 0.5],   # img1 caption: img0 > img2 > img1 -> rank 3
        [0.5, 0.1, 0.4],   # img2 caption: img0 > img2 -> rank 2
        [0.3, 0.2, 0.1],   # img2 caption: img0 > img1 > img2 -> rank 3
    ], dtype=np.float32)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    owner = [0, 0, 1, 1, 2, 2]
    m = retrieval_metrics(images, texts, owner, recall_k=(1, 2, 3))
    # text -> image: ranks of the own image 1, 3, 1, 3, 2, 3
    assert m["image_retrieval_recall@1"] == pytest.approx(2 / 6)
    assert m["image_retrieval_recall@2"] == pytest.approx(3 / 6)
    assert m["image_retrieval_recall@3"] == pytest.approx(1.0)
    # image -> text, per image the caption ranking by score (normalised coordinates):
    # img0 column: t0 .994, t5 .802, t4 .772, t3 .717, t2 .272, t1 .120 -> top1 t0 (own) -> hit@1
    # img1 column: t1 .963, t2 .953, t5 .535, ... -> top1 t1 (img0's) -> miss@1; top2 has t2 (own) -> hit@2
    # img2 column: t4 .617, t3 .598, t5 .267, ... -> top1 t4 (own) -> hit@1
    assert m["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert m["text_retrieval_recall@2"] == pytest.approx(1.0)
    assert set(m) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 2, 3)}


def _clip_benchmark_recall(scores: torch.Tensor, positive_pairs: torch.Tensor, k: int) -> torch.Tensor:
    """CLIP_benchmark's ``recall_at_k`` written out (topk, one-hot, true positives / positives)."""
    nb_texts, nb_images = scores.shape
    topk_indices = torch.topk(scores, k, dim=1)[1]
    nb_positive = positive_pairs.sum(dim=1)
    onehot = torch.nn.functional.one_hot(topk_indices, num_classes=nb_images)
    nb_true_positive = (onehot * positive_pairs.view(nb_texts, 1, nb_images)).sum(dim=(1, 2))
    return nb_true_positive / nb_positive


def test_matches_clip_benchmark_formula_on_random_features():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(40, 16)).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    owner = np.repeat(np.arange(40), 5)
    texts = images[owner] + 1.5 * rng.normal(size=(200, 16)).astype(np.float32)  # noisy captions
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    ours = retrieval_metrics(images, texts, owner, recall_k=(1, 5, 10))
    scores = torch.from_numpy(texts) @ torch.from_numpy(images).T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(200), torch.from_numpy(owner)] = True
    for k in (1, 5, 10):
        image_r = (_clip_benchmark_recall(scores, positive, k) > 0).float().mean().item()
        text_r = (_clip_benchmark_recall(scores.T, positive.T, k) > 0).float().mean().item()
        assert ours[f"image_retrieval_recall@{k}"] == pytest.approx(image_r, abs=1e-6)
        assert ours[f"text_retrieval_recall@{k}"] == pytest.approx(text_r, abs=1e-6)
    assert 0 < ours["image_retrieval_recall@1"] < ours["image_retrieval_recall@10"] < 1


def test_bad_inputs():
    with pytest.raises(ValueError, match="one image row"):
        retrieval_metrics(np.eye(2), np.eye(2), [0, 2])
    with pytest.raises(ValueError, match="positive"):
        retrieval_metrics(np.eye(2), np.eye(2), [0, 1], recall_k=(0,))
    # k above the number of candidates is clipped: everything is found
    m = retrieval_metrics(np.eye(2), np.eye(2), [0, 1], recall_k=(5,))
    assert m["image_retrieval_recall@5"] == 1.0 == m["text_retrieval_recall@5"]


def _check_json(out, dataset: str, num_images: int, num_texts: int) -> dict:
    files = list(out.glob("retrieval_*.json"))
    assert len(files) == 1
    record = json.loads(files[0].read_text())
    assert record["task"] == "zeroshot_retrieval" and record["dataset"] == dataset
    assert {"model", "pretrained", "metrics", "cliplab"} <= set(record)
    expected = {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}
    assert set(record["metrics"]) == expected
    assert all(0.0 <= v <= 1.0 for v in record["metrics"].values())
    assert record["cliplab"]["num_images"] == num_images and record["cliplab"]["num_texts"] == num_texts
    assert record["cliplab"]["model_id"] == "tiny-seed0"
    return record


def test_cli_on_a_caption_manifest(tmp_path):
    from cliplab.cli.app import app

    rows = []
    for i, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 200, 0)]):
        Image.new("RGB", (40, 40), color).save(tmp_path / f"im{i}.png")
        rows.append({"image": f"im{i}.png", "captions": [f"picture number {i}", "a plain square " * 40]})
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["retrieval-eval", "--model", "tiny", "--dataset", str(manifest), "-o", str(out),
                                      "-q", "-j", "0", "--long-text", "chunk", "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert "text -> image" in result.output and "image -> text" in result.output
    record = _check_json(out, "pairs", 4, 8)
    assert record["cliplab"]["long_text"] == {"policy": "chunk", "context_length": 77, "longer_than_context": 4}
    bad = CliRunner().invoke(app, ["retrieval-eval", "--model", "tiny", "--dataset", str(manifest), "-o", str(out),
                                   "--recall-k", "0"])
    assert bad.exit_code == 2 and "--recall-k" in bad.output


@pytest.mark.slow
def test_cli_on_coco_mini(tmp_path, data_root):
    from cliplab.cli.app import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["retrieval-eval", "--model", "tiny", "--dataset", "coco_mini", "-o", str(out),
                                      "-q", "-j", "0", "--data-root", str(data_root)])
    assert result.exit_code == 0, result.output
    _check_json(out, "coco", 159, 795)
