"""ReCo: co-segmentation (a planted shared vector lands the seeds on the planted patches; the reference equals a
written-out loop of the formula, which wrong variants fail), context elimination, and the method end to end on
the tiny model with a folder and a search index as the collection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cliplab.dense.reco import context_weights, reference_embedding, text_attention
from cliplab.errors import CliplabError


def _planted(n=6, d=32, h=4, w=5, seed=0, noise=0.0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, d, h, w, generator=g)
    shared = torch.randn(d, generator=g)
    where = torch.stack([torch.randint(0, h, (n,), generator=g), torch.randint(0, w, (n,), generator=g)], 1)
    for i, (r, c) in enumerate(where.tolist()):  # the same direction at a different norm in every image
        features[i, :, r, c] = (0.5 + i) * (shared + noise * torch.randn(d, generator=g))
    return features, shared, where


def test_a_planted_shared_vector_lands_the_seeds_on_the_planted_patches():
    for seed in range(5):
        features, shared, where = _planted(seed=seed)
        reference, seeds = reference_embedding(features)
        assert seeds.tolist() == where.tolist()
        torch.testing.assert_close(reference, F.normalize(shared, dim=0))


def _loop_reference(features, weights):
    """The brief's formula, one patch at a time: score(p) = mean_j max_{q in j} cos(p, q) w_q; seed_i = argmax over
    image i's patches; reference = normalise(mean_i raw feature at seed_i)."""
    n, d, h, w = features.shape
    unit = F.normalize(features, dim=1)
    seeds, raw = [], []
    for i in range(n):
        best, best_at = None, None
        for r in range(h):
            for c in range(w):
                per_image = []
                for j in range(n):
                    per_image.append(max(float(unit[i, :, r, c] @ unit[j, :, rr, cc]) * float(weights[j, rr, cc])
                                         for rr in range(h) for cc in range(w)))
                score = sum(per_image) / n
                if best is None or score > best:
                    best, best_at = score, (r, c)
        seeds.append(list(best_at))
        raw.append(features[i, :, best_at[0], best_at[1]])
    mean = torch.stack(raw).mean(0)
    return mean / mean.norm(), seeds


def test_the_reference_equals_the_written_out_formula_and_wrong_variants_differ():
    g = torch.Generator().manual_seed(7)
    features = torch.randn(4, 6, 3, 3, generator=g) * torch.rand(4, 1, 3, 3, generator=g) * 3  # varied norms
    weights = torch.rand(4, 3, 3, generator=g)
    reference, seeds = reference_embedding(features, weights)
    expected, expected_seeds = _loop_reference(features, weights)
    assert seeds.tolist() == expected_seeds
    torch.testing.assert_close(reference, expected)
    # the same data under wrong formulas gives other answers, so the check above has teeth
    unit_seeds = F.normalize(torch.stack([features[i, :, r, c] for i, (r, c) in enumerate(expected_seeds)]), dim=1)
    assert not torch.allclose(F.normalize(unit_seeds.mean(0), dim=0), expected, atol=1e-3)  # mean of unit seeds
    _, unweighted = _loop_reference(features, torch.ones(4, 3, 3))
    assert unweighted != expected_seeds  # weights ignored


def test_context_elimination_moves_the_seeds_off_the_context():
    g = torch.Generator().manual_seed(3)
    n, d, h, w = 5, 24, 4, 4
    features = 0.3 * torch.randn(n, d, h, w, generator=g)
    context, concept = F.normalize(torch.randn(2, d, generator=g), dim=1)
    for i in range(n):
        features[i, :, 0, 0] = context  # exactly shared: the strongest co-occurrence
        features[i, :, 3, 2] = concept + 0.2 * torch.randn(d, generator=g)
    _, seeds = reference_embedding(features)
    assert seeds.tolist() == [[0, 0]] * n
    weights = context_weights(features, context[None])
    torch.testing.assert_close(weights[:, 0, 0], torch.full((n,), 1 - torch.sigmoid(torch.tensor(1.0)).item()))
    _, seeds = reference_embedding(features, weights)
    assert seeds.tolist() == [[3, 2]] * n


def test_attention_and_context_weights_are_the_sigmoids_written_out():
    g = torch.Generator().manual_seed(4)
    tokens, text, refs = torch.randn(2, 5, 3, 3, generator=g), torch.randn(5, 4, generator=g), torch.randn(2, 5,
                                                                                                         generator=g)
    text = F.normalize(text, dim=0)
    got = text_attention(tokens, text, 10.0)
    for n, c, r, s in [(0, 0, 0, 0), (1, 3, 2, 1), (0, 2, 1, 2)]:
        cos = F.cosine_similarity(tokens[n, :, r, s], text[:, c], dim=0)
        assert float(got[n, c, r, s]) == pytest.approx(float(torch.sigmoid(10 * cos)), rel=1e-5)
        expected = 1.0
        for k in range(2):
            expected *= 1 - float(torch.sigmoid(F.cosine_similarity(tokens[n, :, r, s], refs[k], dim=0)))
        assert float(context_weights(tokens, refs)[n, r, s]) == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(text_attention(tokens, text[:, 1], 10.0), got[:, 1])


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny():
    from cliplab.models import load_model

    return load_model("tiny")


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    folder = tmp_path_factory.mktemp("collection")
    rng = np.random.default_rng(0)
    for k in range(7):
        colour = rng.integers(0, 255, 3)
        image = np.clip(colour + rng.normal(0, 40, (20 + k, 24, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"im{k}.png")
    return folder


def _segmenter(tiny, collection, cache, **params):
    from cliplab.dense.inference import Segmenter

    return Segmenter(tiny, "reco", ["cat", "sky"], templates=["a photo of a {}."], cache_dir=cache,
                     params={"collection": str(collection), **params})


def test_reco_retrieves_top_k_and_scores_by_cosine_to_the_references(tiny, collection, tmp_path):
    from cliplab.data import load_dataset
    from cliplab.features import embed_images
    from cliplab.features.text import class_weights

    seg = _segmenter(tiny, collection, tmp_path, k=3, context="sky,tree")
    method = seg.method
    embedded = embed_images(tiny, load_dataset(collection), tmp_path, progress=False)
    text = class_weights(tiny, ["cat", "sky"], ["a photo of a {}."], cache_dir=tmp_path)
    order = np.argsort(-(np.asarray(embedded.features) @ text[:, 0]), kind="stable")[:3]
    assert method.retrieved_["cat"] == [embedded.item_ids[i] for i in order]
    assert list(method.context_references_) == ["sky", "tree"]
    torch.testing.assert_close(method.references_[1], method.context_references_["sky"])  # a context class
    torch.testing.assert_close(method.references_.norm(dim=1), torch.ones(2))
    window = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    scores = method.patch_scores(window)
    tokens = seg.tower.tokens(window, "value").permute(0, 3, 1, 2)
    expected = torch.sigmoid(torch.einsum("ndhw,cd->nchw", F.normalize(tokens, dim=1), method.references_))
    expected = expected * text_attention(tokens, torch.from_numpy(text), 10.0)
    torch.testing.assert_close(scores, expected)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 45, 3), dtype=np.uint8))
    assert seg.segment(image).labels.shape == (30, 45)


def test_reco_from_a_search_index_retrieves_what_the_folder_does(tiny, collection, tmp_path):
    from cliplab.search import build_index

    build_index(tiny, collection, tmp_path / "index", cache_dir=tmp_path, progress=False)
    folder = _segmenter(tiny, collection, tmp_path, k=4, context_elimination=False).method
    index = _segmenter(tiny, tmp_path / "index", tmp_path, k=4, context_elimination=False).method
    for name in ("cat", "sky"):
        assert [Path(p).name for p in index.retrieved_[name]] == [Path(p).name for p in folder.retrieved_[name]]
    torch.testing.assert_close(index.references_, folder.references_)


def test_reco_refuses_a_missing_collection_and_bad_options(tiny, tmp_path):
    with pytest.raises(CliplabError, match="reco needs an unlabelled image collection"):
        _segmenter(tiny, "", tmp_path)
    with pytest.raises(CliplabError, match="reco collection not found"):
        _segmenter(tiny, tmp_path / "nowhere", tmp_path)
    with pytest.raises(CliplabError, match="reco features must be one of value, final, guidance"):
        _segmenter(tiny, tmp_path, tmp_path, features="dino")


def test_reco_co_segments_with_a_guidance_encoder_on_its_own_grid(tiny, collection, tmp_path):
    from cliplab.dense.inference import Segmenter

    def guidance(images):  # a stand-in self-supervised encoder: 3-d features on a 2 x 2 grid
        return F.avg_pool2d(images, 16)

    seg = Segmenter(tiny, "reco", ["cat", "dog"], templates=["a photo of a {}."], cache_dir=tmp_path,
                    guidance=guidance, params={"collection": str(collection), "k": 3, "features": "guidance",
                                               "context_elimination": False})
    method = seg.method
    assert method.references_.shape == (2, 3)
    window = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = seg.tower.tokens(window, "value").permute(0, 3, 1, 2)
    scores = torch.sigmoid(torch.einsum("ndhw,cd->nchw", F.normalize(guidance(window), dim=1), method.references_))
    expected = F.interpolate(scores, size=tokens.shape[-2:], mode="bilinear", align_corners=False)
    expected = expected * text_attention(tokens, method.context_.text_weights, 10.0)
    torch.testing.assert_close(method.patch_scores(window), expected)
    with pytest.raises(CliplabError, match="features=guidance needs a guidance encoder"):
        _segmenter(tiny, collection, tmp_path, features="guidance")
