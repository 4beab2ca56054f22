"""The class-incremental protocol's method door (eval/incremental.py): registry lookups, naive refits, image sources."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cliplab.data import load_dataset
from cliplab.errors import CliplabError
from cliplab.eval.incremental import (
    UNSUPPORTED_NEEDS,
    NaiveRefit,
    _encode,
    _image_source,
    check_method,
    draw_shots,
    incremental_methods,
    run_incremental,
    session_accuracies,
    session_learner,
)
from cliplab.heads import create_head, head_entry
from cliplab.heads.saving import load_head

COLOURS = ((220, 40, 40), (40, 220, 40), (40, 40, 220), (220, 220, 40))


@pytest.fixture()
def paints(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("test", 2)):
        for c, colour in enumerate(COLOURS):
            folder = tmp_path / "paints" / split / f"kind{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 30, (20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return tmp_path / "paints"


def test_methods_come_from_the_registry():
    methods = incremental_methods()
    assert {"cpe-clip", "coop", "osloprompt"} <= set(methods)
    assert session_learner(head_entry("cpe-clip").cls) and not session_learner(head_entry("coop").cls)
    assert check_method("coop").name == "coop"
    for name, message in (("linear-probe", "neither a session learner"), ("nola", "needs llm, unlabelled"),
                          ("nope", "nope")):
        with pytest.raises(CliplabError, match=message) as error:
            check_method(name)
        assert "\n" not in str(error.value)
    from cliplab.cli.incremental import _UNSUPPORTED, METHOD_CHOICES

    assert set(UNSUPPORTED_NEEDS) == _UNSUPPORTED  # the command's help reads the same rule from source
    assert set(METHOD_CHOICES.split(", ")) == set(methods)


def test_a_method_without_learn_session_is_refit_per_session(tiny, paints, tmp_path):
    train, test = load_dataset(str(paints), split="train"), load_dataset(str(paints), split="test")
    sessions = [[0, 1], [2, 3]]
    result = run_incremental(tiny, train, test, sessions, 2, method="coop", params={"max_epoch": 1}, seed=3,
                             output_dir=tmp_path / "run")
    names = list(train.class_names)
    labels = np.asarray(train.labels)
    test_labels = np.asarray(test.labels)
    X_test = _encode(tiny, test, np.arange(len(test)))
    for t in range(2):
        rows = draw_shots(labels, sessions[t], 2, 3)
        seen = [c for s in sessions[:t + 1] for c in s]
        # by hand: a fresh CoOp over the seen classes fitted on this session's shots only
        head = create_head("coop", backbone=tiny, class_names=[names[c] for c in seen], max_epoch=1).fit(
            _encode(tiny, train, rows), np.asarray([seen.index(int(c)) for c in labels[rows]]))
        full = np.full((len(test), 4), -np.inf)
        full[:, seen] = head.logits(X_test)
        assert result.acc[t] == pytest.approx(session_accuracies(full, test_labels, sessions[:t + 1]))
        saved = load_head(tmp_path / "run" / f"session-{t + 1}", tiny, method="coop")
        np.testing.assert_allclose(saved.weights_, head.weights_, rtol=1e-6)
    again = run_incremental(tiny, train, test, sessions, 2, method="coop", params={"max_epoch": 1}, seed=3,
                            output_dir=tmp_path / "run")  # finished: resumed, nothing trained
    assert again.accuracy == result.accuracy


def test_naive_logits_cover_every_class_and_refuse_reserved_parameters(tiny, paints):
    train, test = load_dataset(str(paints), split="train"), load_dataset(str(paints), split="test")
    model = NaiveRefit(head_entry("coop"), tiny, train.class_names, {"max_epoch": 1})
    rows = draw_shots(np.asarray(train.labels), [2, 3], 1, 0)
    model.learn_session(_encode(tiny, train, rows), np.asarray(train.labels)[rows])
    logits = model.logits(_encode(tiny, test, np.arange(3)))
    assert logits.shape == (3, 4) and np.isneginf(logits[:, :2]).all() and np.isfinite(logits[:, 2:]).all()
    with pytest.raises(CliplabError, match="parameter checkpoint_dir: set by the incremental protocol"):
        run_incremental(tiny, train, test, [[0, 1]], 1, method="coop", params={"checkpoint_dir": "x"})


def test_test_images_go_through_a_head_backbone_only_where_it_changes_them(tiny, paints):
    test = load_dataset(str(paints), split="test")
    rows = np.arange(len(test))

    class Holder:
        def __init__(self, backbone):
            self.backbone_ = backbone

    same = tiny.derive("copy")  # identical weights: the base model's features are reused
    assert _image_source(Holder(same), tiny, test, rows) is tiny
    changed = tiny.derive("changed")
    with torch.no_grad():
        for name, param in changed.model.named_parameters():  # noise on every image-tower weight
            if name.startswith("visual"):
                param.add_(0.1 * torch.randn(param.shape, generator=torch.Generator().manual_seed(0)))
    assert _image_source(Holder(changed), tiny, test, rows) is changed
    assert _image_source(Holder(None), tiny, test, rows) is tiny
