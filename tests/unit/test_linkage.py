"""Record linkage (CLIPPINGS, paper 40): pooling, thresholded nearest-neighbour links, components, pairwise P/R/F1."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from PIL import Image

from cliplab.errors import CliplabError, DatasetError
from cliplab.eval.linkage import clusters, link_manifest, link_pairs, pairwise_scores, pool, read_records


def test_pool_is_the_normalised_sum_and_symmetric():
    rng = np.random.default_rng(0)
    image, text = rng.normal(size=(5, 8)), rng.normal(size=(5, 8))
    pooled = pool(image, text)
    a = image / np.linalg.norm(image, axis=1, keepdims=True)
    b = text / np.linalg.norm(text, axis=1, keepdims=True)
    expected = (a + b) / np.linalg.norm(a + b, axis=1, keepdims=True)
    np.testing.assert_allclose(pooled, expected, atol=1e-6)
    np.testing.assert_array_equal(pool(text, image), pooled)  # swapping the roles of image and text
    np.testing.assert_allclose(pool(image, text, 1.0), a, atol=1e-6)  # weight 1: the image alone
    assert not np.allclose(pool(image, text, 0.8), pool(text, image, 0.8))


def test_links_and_components_follow_the_threshold():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(3, 16))
    x = np.concatenate([base, base[:1], base[1:2] + 1e-3 * rng.normal(size=(1, 16))])  # 3 = copy of 0, 4 ~ 1
    pairs, cosines = link_pairs(x, threshold=0.99, neighbours=3)
    assert [tuple(p) for p in pairs] == [(0, 3), (1, 4)]
    assert cosines[0] == pytest.approx(1.0, abs=1e-6)
    labels = clusters(len(x), pairs)
    assert labels[0] == labels[3] and labels[1] == labels[4] and len(set(labels.tolist())) == 3
    nothing, _ = link_pairs(x, threshold=1.0 + 1e-6)  # above 1: no links, even for exact copies
    assert len(nothing) == 0 and len(set(clusters(len(x), nothing).tolist())) == len(x)
    everything, _ = link_pairs(x, threshold=-1.0, neighbours=10)
    assert len(everything) == len(x) * (len(x) - 1) // 2


def test_link_pairs_matches_brute_force_with_enough_neighbours():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(12, 4))
    pairs, cosines = link_pairs(x, threshold=0.5, neighbours=11)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = unit @ unit.T
    expected = [(i, j) for i, j in itertools.combinations(range(12), 2) if sims[i, j] >= 0.5]
    assert [tuple(p) for p in pairs] == expected
    np.testing.assert_allclose(cosines, [sims[i, j] for i, j in expected], atol=1e-5)


def test_pairwise_scores_hand_computed():
    # truth: {0,1,2} {3,4}; predicted: {0,1} {2,3,4}. True pairs 01 02 12 34 (4); predicted 01 23 24 34 (4);
    # correct 01 34 (2): precision 2/4, recall 2/4, F1 1/2.
    s = pairwise_scores([0, 0, 1, 1, 1], [7, 7, 7, 9, 9])
    assert (s["true_pairs"], s["predicted_pairs"], s["correct_pairs"]) == (4, 4, 2)
    assert s["precision"] == pytest.approx(0.5) and s["recall"] == pytest.approx(0.5) and s["f1"] == pytest.approx(0.5)
    # one big cluster: 10 predicted, 4 correct; an unlabelled record (-1) is left out
    s = pairwise_scores([0, 0, 0, 0, 0, 0], [7, 7, 7, 9, 9, -1])
    assert s["precision"] == pytest.approx(4 / 10) and s["recall"] == 1.0 and s["records"] == 5
    assert s["f1"] == pytest.approx(2 * 0.4 / 1.4)
    s = pairwise_scores([0, 1, 2], [0, 0, 1])  # no links: precision 0 by convention, recall 0
    assert s["precision"] == 0.0 and s["recall"] == 0.0 and s["f1"] == 0.0


def test_pairwise_scores_match_brute_force():
    rng = np.random.default_rng(3)
    predicted, truth = rng.integers(0, 4, 15), rng.integers(0, 3, 15)
    both = list(itertools.combinations(range(15), 2))
    pred = {p for p in both if predicted[p[0]] == predicted[p[1]]}
    true = {p for p in both if truth[p[0]] == truth[p[1]]}
    s = pairwise_scores(predicted, truth)
    assert s["precision"] == pytest.approx(len(pred & true) / len(pred))
    assert s["recall"] == pytest.approx(len(pred & true) / len(true))


def _records(folder, rows):
    path = folder / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_exact_duplicate_records_link(tmp_path, tiny):
    rng = np.random.default_rng(4)
    for name in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    (tmp_path / "a2.png").write_bytes((tmp_path / "a.png").read_bytes())
    rows = [{"path": "a.png", "caption": "Tokyo Steel Co.", "label": "x"},
            {"path": "b.png", "caption": "Osaka Cotton Mill", "label": "y"},
            {"path": "a2.png", "caption": "Tokyo Steel Co.", "label": "x"},
            {"path": "c.png", "caption": "a harbour at dawn", "label": "z"}]
    result = link_manifest(tiny, _records(tmp_path, rows), threshold=0.9999, neighbours=3, cache_dir=tmp_path / "c")
    assert (0, 2) in {tuple(p) for p in result.pairs}
    assert result.cluster[0] == result.cluster[2]
    image = tiny.encode_images(tiny.preprocess(Image.open(tmp_path / "b.png").convert("RGB"))[None]).numpy()
    text = tiny.encode_texts(["Osaka Cotton Mill"]).numpy()
    np.testing.assert_allclose(result.embeddings[1], pool(image, text)[0], atol=1e-5)
    assert result.scores["recall"] == 1.0
    assert result.rows()[2]["label"] == "x" and result.rows()[0]["cluster_size"] >= 2
    nothing = link_manifest(tiny, _records(tmp_path, rows), threshold=1.01, cache_dir=tmp_path / "c")
    assert len(nothing.pairs) == 0 and nothing.scores["predicted_pairs"] == 0


def test_bad_manifests_fail_in_one_line_naming_the_row(tmp_path, tiny):
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(DatasetError, match=r"records.jsonl: row 2 has no caption") as info:
        read_records(_records(tmp_path, [{"path": "a.png", "caption": "x"}, {"path": "a.png"}]))
    assert "\n" not in str(info.value)
    with pytest.raises(DatasetError, match=r"records.jsonl: row 2: image gone.png cannot be read"):
        rows = [{"path": "a.png", "caption": "x"}, {"path": "gone.png", "caption": "y"}]
        link_manifest(tiny, _records(tmp_path, rows), cache_dir=tmp_path / "c")
    csv = tmp_path / "r.csv"
    csv.write_text("image,caption\na.png,x\n")
    with pytest.raises(DatasetError, match="r.csv.*'path' column"):
        read_records(csv)
    with pytest.raises(CliplabError, match="outside"):
        pool(np.ones((1, 2)), np.ones((1, 2)), 1.5)


def test_supcon_loss_matches_the_written_out_formula():
    import torch

    from cliplab.eval.linkage import supcon_loss

    rng = np.random.default_rng(5)
    z = rng.normal(size=(6, 4))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    labels = np.array([0, 0, 1, 1, 1, 2])  # record 5 has no positive: not an anchor
    t = 0.2
    total, anchors = 0.0, 0
    for i in range(6):
        positives = [p for p in range(6) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        denominator = sum(np.exp(z[i] @ z[a] / t) for a in range(6) if a != i)
        total += -np.mean([np.log(np.exp(z[i] @ z[p] / t) / denominator) for p in positives])
        anchors += 1
    loss = supcon_loss(torch.tensor(z), torch.tensor(labels), t)
    assert float(loss) == pytest.approx(total / anchors, rel=1e-9)


def test_tuned_adapter_improves_held_out_linkage():
    from cliplab.eval.linkage import apply_adapter, tune_adapter

    rng = np.random.default_rng(6)
    means = rng.normal(size=(8, 4))

    def draw(per_class):  # identity in dims 0-3, a larger nuisance in dims 4-11
        y = np.repeat(np.arange(8), per_class)
        x = np.concatenate([means[y] + 0.1 * rng.normal(size=(len(y), 4)), 1.5 * rng.normal(size=(len(y), 8))], 1)
        return x.astype(np.float32), y

    (train, train_y), (test, test_y) = draw(6), draw(4)  # held-out records never reach the fit
    np.testing.assert_allclose(apply_adapter(test, np.eye(12)), apply_adapter(test, None), atol=1e-6)

    def f1(x):
        return pairwise_scores(clusters(len(x), link_pairs(x, 0.8, 5)[0]), test_y)["f1"]

    adapter = tune_adapter(train, train_y, epochs=20, lr=0.05, seed=0)
    before, after = f1(apply_adapter(test, None)), f1(apply_adapter(test, adapter))
    assert after > before + 0.2, (before, after)
