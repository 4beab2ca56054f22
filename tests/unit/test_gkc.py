"""GKC: the synonym classifier (one name per class is the plain classifier; scores are the mean / max of each
class's name cosines, written out) for any dense method, and the text-guided distillation loss against a
written-out double loop of the authors' ``loss_text_kd``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cliplab.dense.gkc import class_names_with_synonyms, synonym_classifier, text_guided_kd_loss
from cliplab.dense.inference import Segmenter
from cliplab.errors import CliplabError
from cliplab.features.text import class_weights
from cliplab.models import load_model

TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]
NAMES = ["cat", "dog", "grass"]


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def test_one_name_per_class_equals_the_plain_classifier(tiny, tmp_path):
    plain = class_weights(tiny, NAMES, TEMPLATES, cache_dir=tmp_path)
    for synonyms in ({}, {"cat": []}, {"cat": ["Cat", " cat "], "dog": ["  "]}):  # repeats and blanks drop out
        got = synonym_classifier(tiny, NAMES, synonyms, TEMPLATES, cache_dir=tmp_path)
        np.testing.assert_array_equal(got.weights, plain)
        assert got.names == NAMES and got.groups.tolist() == [0, 1, 2]


def test_scores_are_the_mean_and_max_of_each_class_names_cosines(tiny, tmp_path):
    synonyms = {"cat": ["kitty", "feline"], "grass": ["lawn"]}
    assert class_names_with_synonyms(NAMES, synonyms) == [["cat", "kitty", "feline"], ["dog"], ["grass", "lawn"]]
    clf = synonym_classifier(tiny, NAMES, synonyms, TEMPLATES, cache_dir=tmp_path)
    features = F.normalize(torch.randn(7, tiny.embed_dim, generator=torch.Generator().manual_seed(0)), dim=1)
    expected_mean, expected_max = torch.zeros(7, 3), torch.zeros(7, 3)
    for c, names in enumerate([["cat", "kitty", "feline"], ["dog"], ["grass", "lawn"]]):
        cosines = []
        for name in names:  # each name's own prompt ensemble, embedded on its own
            w = torch.from_numpy(class_weights(tiny, [name], TEMPLATES, cache_dir=tmp_path))[:, 0]
            cosines.append(features @ w)
        expected_mean[:, c] = torch.stack(cosines).mean(0)
        expected_max[:, c] = torch.stack(cosines).max(0).values
    torch.testing.assert_close(features @ torch.from_numpy(clf.weights), expected_mean)  # one linear matrix
    torch.testing.assert_close(clf.logits(features), expected_mean)
    torch.testing.assert_close(clf.logits(features, "max"), expected_max)
    assert not torch.allclose(expected_mean, expected_max)
    with pytest.raises(CliplabError, match="one of mean, max"):
        clf.logits(features, "median")


def test_any_dense_method_takes_the_synonym_classifier(tiny, tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 40, 3), dtype=np.uint8))
    for method, params in (("maskclip", {}), ("dinoiser", {"guidance_layer": 0})):
        plain = Segmenter(tiny, method, NAMES, templates=TEMPLATES, cache_dir=tmp_path, params=params)
        same = Segmenter(tiny, method, NAMES, templates=TEMPLATES, cache_dir=tmp_path, params=params,
                         synonyms={"cat": []})
        diverse = Segmenter(tiny, method, NAMES, templates=TEMPLATES, cache_dir=tmp_path, params=params,
                            synonyms={"cat": ["kitty", "feline"], "dog": ["puppy"]})
        torch.testing.assert_close(same.method.context_.text_weights, plain.method.context_.text_weights)
        expected = synonym_classifier(tiny, NAMES, {"cat": ["kitty", "feline"], "dog": ["puppy"]}, TEMPLATES,
                                      cache_dir=tmp_path).weights
        np.testing.assert_array_equal(diverse.method.context_.text_weights.numpy(), expected)
        np.testing.assert_array_equal(same.segment(image).labels, plain.segment(image).labels)


def _written_out(v, c, t, image, s):
    v, c, t = (F.normalize(x, dim=1) for x in (v, c, t))
    plain, guided = [], []
    for i in range(len(v)):
        plain.append(float(((v[i] - c[i]) ** 2).sum()))
        for j in range(len(v)):
            if image[i] == image[j]:
                guided.append(float((s * s * (t[i] @ t[j]) - v[i] @ c[j]) ** 2))
    return plain, guided


def test_text_guided_distillation_equals_the_written_out_loss():
    g = torch.Generator().manual_seed(1)
    v, c, t = (torch.randn(6, 5, generator=g) for _ in range(3))
    image = [0, 0, 1, 2, 2, 2]
    scale = torch.tensor(1.3, requires_grad=True)
    plain, guided = _written_out(v, c, t, image, 1.3)
    loss = text_guided_kd_loss(v, c, t, image, scale)
    assert float(loss.detach()) == pytest.approx(np.mean(plain + guided), rel=1e-5)
    assert len(guided) == 2 * 2 + 1 + 3 * 3  # pairs within each image only
    p, q = text_guided_kd_loss(v, c, t, image, 1.3, separate=True)
    assert (float(p), float(q)) == pytest.approx((np.mean(plain), np.mean(guided)), rel=1e-5)
    loss.backward()
    assert scale.grad is not None and float(scale.grad) != 0.0  # the text scale is learnable, as theirs
    student = v.clone().requires_grad_(True)
    teacher = c.clone().requires_grad_(True)
    text_guided_kd_loss(student, teacher, t, image).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None  # CLIP's side is the frozen teacher


def test_distillation_is_zero_when_student_teacher_and_text_agree():
    c = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    assert float(text_guided_kd_loss(c, c, c, [0, 0, 1, 1])) == pytest.approx(0.0, abs=1e-10)
    assert float(text_guided_kd_loss(c, c, c.flip(0), [0, 0, 1, 1])) > 1e-3
