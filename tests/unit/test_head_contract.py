"""Every registered head passes scikit-learn's estimator checks, except those it declares it cannot pass.

A head declares them in its own file, ``_contract_skips = {"check_name": "reason"}`` in its class body (shared
families at the end of heads/base.py), as scikit-learn's estimator tags declare what an estimator supports. Every
other check runs as its own test; the declared ones must still fail (a declared check that starts passing fails the
run, and so does a name that is not one of the checks scikit-learn runs for that head). What the skipped checks
would have covered runs at the model's real width in test_cliplab_contract.py. The heads checked are compared with
the ``@register`` classes found in the heads' source files, so a head that the registry does not load cannot go
unchecked.
"""

from __future__ import annotations

import ast
import inspect
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.utils.estimator_checks import estimator_checks_generator

import cliplab.heads
from cliplab.data.base import ArrayImageDataset
from cliplab.heads import create_head, head_entry, list_heads
from cliplab.heads.registry import NOT_HEADS
from cliplab.models import load_model

TINY = load_model("tiny", device="cpu")
CACHE = tempfile.mkdtemp(prefix="cliplab-head-checks-")
HEADS_DIR = Path(cliplab.heads.__file__).resolve().parent
SHARED = {"__init__", *NOT_HEADS}  # heads/ modules that are not heads (the registry says which)


def declared_skips(head) -> dict[str, str]:
    """The contract skips a head's class declares."""
    return dict(getattr(type(head), "_contract_skips", {}))


def _sklearn_skips(head) -> dict[str, str]:
    return {name: reason for name, reason in declared_skips(head).items() if name.startswith("check_")}


def _build(entry):
    accepted = inspect.signature(entry.cls.__init__).parameters
    extra = {"cache_dir": CACHE, "templates": ["a photo of a {c}."]}
    return create_head(entry.name, backbone=TINY if entry.needs_backbone else None, class_names=["a", "b", "c"],
                       **{key: value for key, value in extra.items() if key in accepted})


HEADS = [_build(entry) for entry in list_heads()]


def _check_name(check) -> str:
    return check.func.__name__ if isinstance(check, partial) else check.__name__


def _checks(head) -> list:
    """scikit-learn's estimator checks for ``head`` (a check may come once per instance it builds)."""
    return [check for _, check in estimator_checks_generator(head, legacy=True, mark=None)]


# The checks each head passes, one test each. The declared skips are not parametrized as xfails: pytest formats
# the traceback of every expected failure against scikit-learn's source, most of this file's time; they run in
# test_declared_skips_still_fail instead, which fails if one passes (strict).
RUN = [pytest.param(head, check, id=f"{head._registered_name}-{_check_name(check)}")
       for head in HEADS for check in _checks(head) if _check_name(check) not in _sklearn_skips(head)]


@pytest.mark.parametrize("estimator, check", RUN)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


@pytest.mark.parametrize("head", HEADS, ids=lambda h: h._registered_name)
def test_declared_skips_still_fail(head):
    skips = _sklearn_skips(head)
    passing = []
    for check in _checks(head):
        if _check_name(check) in skips:
            try:
                check(head)
            except Exception:  # the declared failure (or a skip: not applicable here either)
                continue
            passing.append(_check_name(check))
    assert not passing, f"declared as failing but pass (drop them from _contract_skips): {sorted(set(passing))}"


def registered_in_source(folder: Path) -> dict[str, str]:
    """name -> module stem of every ``@register("name", ...)`` class in a folder's modules, read without importing
    (modules starting with ``_`` included: the registry skips them, so a head there is never registered)."""
    found = {}
    for path in sorted(folder.glob("*.py")):
        if path.stem in SHARED:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            for decorator in getattr(node, "decorator_list", []) if isinstance(node, ast.ClassDef) else []:
                func = decorator.func if isinstance(decorator, ast.Call) else decorator
                if getattr(func, "id", getattr(func, "attr", None)) != "register":
                    continue
                names = [*decorator.args[:1], *(k.value for k in decorator.keywords if k.arg == "name")]
                assert names and isinstance(names[0], ast.Constant), f"{path.name}: @register without a literal name"
                found[names[0].value] = path.stem
    return found


def test_every_head_in_the_source_is_registered_and_checked():
    in_source = registered_in_source(HEADS_DIR)
    checked = {head._registered_name: type(head).__module__.rsplit(".", 1)[-1] for head in HEADS}
    assert checked == in_source
    head_modules = {p.stem for p in HEADS_DIR.glob("*.py") if p.stem not in SHARED}
    assert set(in_source.values()) == head_modules, "a module of heads/ registers no head"


def test_the_source_scan_finds_every_registration_form(tmp_path):
    (tmp_path / "base.py").write_text('@register("not-a-head", family="x")\nclass Shared: ...\n')
    (tmp_path / "a.py").write_text('@register("a", family="fewshot")\nclass A: ...\n\nclass Plain: ...\n')
    (tmp_path / "b.py").write_text('@registry.register(name="b", family="zeroshot")\nclass B: ...\n')
    (tmp_path / "_wip.py").write_text('@register("c", family="encoder")\nclass C: ...\n')
    assert registered_in_source(tmp_path) == {"a": "a", "b": "b", "c": "_wip"}


@pytest.mark.parametrize("head", HEADS, ids=lambda h: h._registered_name)
def test_declared_skips_name_checks_run_for_the_head_with_a_reason(head):
    skips = _sklearn_skips(head)
    run = {_check_name(check) for check in _checks(head)}
    assert not set(skips) - run, f"not scikit-learn checks of this head: {sorted(set(skips) - run)}"
    for name, reason in declared_skips(head).items():
        assert isinstance(reason, str) and len(reason.split()) >= 3, f"{name}: the reason must say why"


@pytest.mark.parametrize("head", HEADS, ids=lambda h: h._registered_name)
def test_skips_are_declared_in_the_heads_own_module(head):
    owner = next((c for c in type(head).__mro__ if "_contract_skips" in vars(c)), None)
    assert owner is None or owner.__module__ == type(head).__module__, (
        f"{type(head).__name__} inherits its skips from {owner.__module__}.{owner.__name__}; declare them in its file")


@pytest.mark.parametrize("head", HEADS, ids=lambda h: h._registered_name)
def test_two_classes_give_a_margin_and_full_logits(head):
    X = np.eye(TINY.embed_dim, dtype=np.float32)[:8]
    y = np.array([0, 1] * 4)
    head = clone(head)
    if "class_names" in head.get_params():  # a head over named classes: two of them here
        head.set_params(class_names=["a", "b"])
        if "templates" in head.get_params():
            head.set_params(templates=["{c}"])
    if "aux_model" in head.get_params():  # AMU-Tuning: CLIP features followed by an auxiliary model's
        X = np.hstack([X, X])
    head.set_params(**{key: 2 for key in ("epochs", "max_epoch") if key in head.get_params()})  # trainers: short
    images = {}
    if "images" in head_entry(head).needs:  # heads that train through the image tower: one picture per row
        pixels = np.random.default_rng(0).integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8)
        images["images"] = ArrayImageDataset(pixels, y, ["a", "b"], "rows.npy", "rows")
    head.fit(X, y, **images)
    logits = head.logits(X)
    assert logits.shape == (8, 2)
    np.testing.assert_allclose(head.decision_function(X), logits[:, 1] - logits[:, 0], rtol=1e-6)
