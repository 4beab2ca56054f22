"""ComCLIP (paper 45): composed image embeddings, sub-images, the parser, Winoground scores and swapped pairs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cliplab.eval.comclip import (
    MatchItem,
    Relation,
    black_outside,
    comclip_score,
    composed_embedding,
    group_correct,
    image_correct,
    match_scores,
    parse_relation,
    relation_parts,
    text_correct,
    winoground_scores,
)
from cliplab.eval.swapped_pairs import evaluate_pairs, pair_items, swapped_pairs


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _their_score(text, image, subs, words, scale=100.0):
    """ComCLIP's inference_one_pair on embeddings, written out: scores = logit_scale * cos (logits_per_text),
    normalised by their sum, added to the normalised image embedding, then the cosine with the text."""
    scores = [scale * float(_unit(w) @ _unit(s)) for w, s in zip(words, subs)]
    total = sum(scores)
    e = _unit(image).copy()
    for s, sub in zip(scores, subs):
        e = e + (s / total) * _unit(sub)
    return float(_unit(text) @ _unit(e))


def test_no_sub_images_gives_the_clip_score():
    rng = np.random.default_rng(0)
    t, i = _unit(rng.standard_normal(16)), _unit(rng.standard_normal(16))
    assert comclip_score(t, i) == pytest.approx(float(t @ i), abs=1e-12)
    np.testing.assert_array_equal(composed_embedding(i, np.zeros((0, 16)), []), i)


def test_weights_are_raw_cosines_over_their_sum():
    rng = np.random.default_rng(1)
    t, i = _unit(rng.standard_normal(16)), _unit(rng.standard_normal(16))
    subs = _unit(rng.standard_normal((3, 16)))
    words = _unit(subs + 0.5 * rng.standard_normal((3, 16)))  # positive cosines
    assert comclip_score(t, i, subs, words) == pytest.approx(_their_score(t, i, subs, words), abs=1e-12)
    cos = np.sum(subs * words, axis=1)
    want = i + (cos / cos.sum()) @ subs  # not a softmax: a softmax would weigh them otherwise
    np.testing.assert_allclose(composed_embedding(i, subs, cos), want, atol=1e-12)
    soft = np.exp(cos) / np.exp(cos).sum()
    assert not np.allclose(composed_embedding(i, subs, cos), i + soft @ subs)


def test_order_of_sub_images_does_not_matter():
    rng = np.random.default_rng(2)
    t, i = rng.standard_normal(8), rng.standard_normal(8)
    subs, words = rng.standard_normal((4, 8)), rng.standard_normal((4, 8))
    base = comclip_score(t, i, subs, words)
    for perm in ([3, 2, 1, 0], [1, 3, 0, 2]):
        assert comclip_score(t, i, subs[perm], words[perm]) == pytest.approx(base, abs=1e-12)


def test_winoground_definitions_on_a_hand_computed_case():
    # s[c][i]: caption 0 prefers image 0, caption 1 prefers image 1, image 0 prefers caption 0,
    # but image 1 prefers caption 0 (0.7 > 0.6): image correct, not text correct
    s = [[0.9, 0.7], [0.2, 0.6]]
    assert image_correct(s) and not text_correct(s) and not group_correct(s)
    good = [[0.9, 0.1], [0.2, 0.6]]
    assert text_correct(good) and image_correct(good) and group_correct(good)
    text_only = [[0.5, 0.6], [0.4, 0.7]]  # each image prefers its caption; caption 0 prefers image 1
    assert text_correct(text_only) and not image_correct(text_only)
    assert winoground_scores([s, good, text_only, [[0, 0], [0, 0]]]) == {"text": 0.5, "image": 0.5, "group": 0.25}


def test_black_outside_keeps_the_union_of_the_boxes():
    picture = Image.fromarray(np.full((20, 30, 3), 200, dtype=np.uint8))
    out = np.asarray(black_outside(picture, [[2, 3, 4, 5], [20, 10, 2, 2]]))
    assert out.shape == (20, 30, 3)
    assert (out[3:9, 2:7] == 200).all()  # PIL's rectangle includes its far corner: x 2..6, y 3..8
    assert (out[10:13, 20:23] == 200).all()
    assert (out[0, 0] == 0).all() and (out[15, 10] == 0).all() and (out[9, 2] == 0).all()


def test_parser_and_parts():
    assert parse_relation("A dog to the left of a red car.") == Relation("dog", "to the left of", "red car")
    assert parse_relation("The man riding a horse", nouns=["man", "horse"]) == Relation("man", "riding", "horse")
    rel = parse_relation("a cup next to the dining table", nouns=["cup", "dining table", "table"])
    assert rel == Relation("cup", "next to", "dining table")
    parts = relation_parts(rel, {"cup": [[0, 0, 1, 1]], "dining table": [[5, 5, 2, 2]]})
    assert parts == {"cup": [[0, 0, 1, 1]], "dining table": [[5, 5, 2, 2]], "next to": [[5, 5, 2, 2], [0, 0, 1, 1]]}
    assert relation_parts(rel, {"cup": [[0, 0, 1, 1]]})["next to"] is None  # no table box: the whole picture


def _picture(seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8))


def test_match_scores_with_a_model(tiny):
    a, b = _picture(0), _picture(1)
    boxes = {"cat": [[0, 0, 20, 20]], "dog": [[24, 10, 20, 25]], "near": [[0, 0, 20, 20], [24, 10, 20, 25]]}
    items = [MatchItem(a, "a cat near a dog", {}, "a"),
             MatchItem(a, "a cat near a dog", boxes, "a"),
             MatchItem(a, "a cat near a dog", dict(reversed(list(boxes.items()))), "a"),
             MatchItem(b, "a dog near a cat", boxes, "b")]
    clip, com = match_scores(tiny, items)
    assert com[0] == pytest.approx(clip[0], abs=1e-9)  # no parts: CLIP
    assert com[1] == pytest.approx(com[2], abs=1e-9) and com[1] != pytest.approx(clip[1], abs=1e-6)
    import torch

    with torch.no_grad():
        enc = [tiny.encode_images(tiny.preprocess(p)[None])[0].numpy()
               for p in (a, black_outside(a, boxes["cat"]), black_outside(a, boxes["dog"]),
                         black_outside(a, boxes["near"]))]
        txt = tiny.encode_texts(["a cat near a dog", "cat", "dog", "near"]).numpy()
    assert com[1] == pytest.approx(_their_score(txt[0], enc[0], enc[1:], txt[1:]), abs=1e-5)


@pytest.fixture()
def coco_folder(tmp_path):
    """Two 48x40 pictures: cat left of dog in p0, dog left of cat in p1."""
    (tmp_path / "images" / "val2017").mkdir(parents=True)
    for n in range(2):
        _picture(n).save(tmp_path / "images" / "val2017" / f"p{n}.png")
    anns = [(0, 1, [2, 2, 10, 10]), (0, 2, [30, 5, 12, 12]), (1, 2, [1, 1, 12, 12]), (1, 1, [34, 2, 10, 10])]
    data = {"images": [{"id": n, "file_name": f"p{n}.png", "width": 48, "height": 40} for n in range(2)],
            "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
            "annotations": [{"id": k, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
                            for k, (i, c, b) in enumerate(anns)]}
    (tmp_path / "instances_val2017.json").write_text(json.dumps(data))
    return tmp_path


def test_swapped_pairs_from_coco_boxes(coco_folder, tiny):
    pairs = swapped_pairs(coco_folder, seed=0)
    assert sorted(p.kind for p in pairs) == ["mirror", "mirror", "real"]
    mirror = next(p for p in pairs if p.kind == "mirror" and p.paths[0].endswith("p0.png"))
    assert (mirror.left, mirror.right) == ("cat", "dog")
    assert mirror.captions == ("a cat to the left of a dog", "a dog to the left of a cat")
    assert mirror.boxes[1]["cat"] == [[48 - 2 - 10, 2, 10, 10]]  # mirrored
    real = next(p for p in pairs if p.kind == "real")
    assert {real.paths[0][-6:], real.paths[1][-6:]} == {"p0.png", "p1.png"}
    items = pair_items(mirror)
    assert [it.caption for it in items] == [mirror.captions[0]] * 2 + [mirror.captions[1]] * 2
    # caption 0 and caption 1 name the same words: the same sub-images for one picture, in another order
    assert sorted(items[0].parts) == sorted(items[2].parts)
    assert np.asarray(items[1].image).tolist() == np.asarray(items[0].image)[:, ::-1].tolist()
    result = evaluate_pairs(tiny, pairs)
    assert set(result["kinds"]) == {"mirror", "real"} and result["pairs"] == 3
    tables = np.asarray(result["tables"]["clip"])
    assert result["clip"] == winoground_scores(tables)
