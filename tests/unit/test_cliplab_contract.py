"""What scikit-learn's estimator checks would cover, run where they cannot: at the model's real width (the tiny
model's embed dim) with class-index labels, for every registered head (new ones are picked up by the registry).

scikit-learn's checks feed 1-10 random features and float or string labels, so most heads declare them skipped
(``_contract_skips`` in the head's own file). Here every head is fitted on class-structured features of the right
width and must keep: its parameters through ``fit``, clone idempotence and a deterministic refit, predictions
that follow a permutation of the rows, a pickle round trip of the fitted object, the same answers for float64 and
read-only (also memory-mapped) input, and, unless it declares ``cliplab_subset_invariance`` (then that check must
fail: a strict expected failure), the same logits for a row whether it is scored alone or with others.
"""

from __future__ import annotations

import inspect
import pickle
import tempfile
from functools import cache, partial

import joblib
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

from cliplab.data.base import ArrayImageDataset
from cliplab.heads import create_head, head_entry, list_heads
from cliplab.heads.base import ClipHead
from cliplab.models import load_model

TINY = load_model("tiny", device="cpu")
WIDTH = TINY.embed_dim
NAMES = ["cat", "dog", "bird"]
CACHE = tempfile.mkdtemp(prefix="cliplab-contract-")
AUX_WIDTH = 16  # heads that take [CLIP | auxiliary model] features get a 16-d auxiliary block
# Short training where a head trains by epochs: the properties do not depend on how long it trains.
FAST = {"epochs": 2, "max_epoch": 2}
# The properties a head may waive in its ``_contract_skips`` (with the reason), as ``cliplab_<property>``.
WAIVABLE = {"cliplab_subset_invariance"}
METHODS = ("logits", "decision_function", "predict_proba", "predict")
ENTRIES = list_heads()
IDS = [e.name for e in ENTRIES]


def _skips(entry) -> dict[str, str]:
    return dict(getattr(entry.cls, "_contract_skips", {}))


def _build(entry, **params):
    accepted = inspect.signature(entry.cls.__init__).parameters
    extra = {"cache_dir": CACHE, "templates": ["a photo of a {c}."], **FAST, **params}
    return create_head(entry.name, backbone=TINY if entry.needs_backbone else None, class_names=NAMES,
                       **{k: v for k, v in extra.items() if k in accepted})


def _takes_aux(entry) -> bool:
    return "aux_features" in getattr(entry, "needs", ()) or "aux_model" in inspect.signature(entry.cls).parameters


@cache
def _data(entry_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X_train, y_train, X_test): L2-normalised features near one direction per class, at the head's width."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(len(NAMES), WIDTH))

    def draw(y):
        x = centres[y] + 0.6 * rng.normal(size=(len(y), WIDTH))
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    y = np.repeat(np.arange(len(NAMES)), 6)
    X, X_test = draw(y), draw(np.tile(np.arange(len(NAMES)), 4))
    entry = next(e for e in ENTRIES if e.name == entry_name)
    if _takes_aux(entry):
        X, X_test = (np.hstack([x, rng.normal(size=(len(x), AUX_WIDTH))]) for x in (X, X_test))
    return X.astype(np.float32), y, X_test.astype(np.float32)


def _fit(head, X, y):
    """``head.fit(X, y)``, with ``images`` (small seeded pictures, one per row) for heads that read images."""
    name = getattr(type(head), "_registered_name", None)
    if name is not None and "images" in head_entry(name).needs:
        pixels = np.random.default_rng(0).integers(0, 256, size=(len(X), 32, 32, 3), dtype=np.uint8)
        return head.fit(X, y, images=ArrayImageDataset(pixels, np.asarray(y), NAMES, "rows.npy", "rows"))
    return head.fit(X, y)


@cache
def _fitted(entry_name: str):
    entry = next(e for e in ENTRIES if e.name == entry_name)
    X, y, _ = _data(entry_name)
    return _fit(_build(entry), X, y)


def _outputs(head, X) -> dict[str, np.ndarray]:
    return {method: np.asarray(getattr(head, method)(X)) for method in METHODS}


def _assert_same_outputs(got: dict, expected: dict, rtol=1e-5, atol=1e-6):
    for method in METHODS:
        if method == "predict":
            np.testing.assert_array_equal(got[method], expected[method])
        else:
            np.testing.assert_allclose(got[method], expected[method], rtol=rtol, atol=atol, err_msg=method)


def _fingerprint(value) -> str:
    """A parameter's content: a Backbone by its weights (fit must never train the shared model in place)."""
    model = getattr(value, "model", None)
    if hasattr(model, "state_dict"):
        sums = [float(t.double().sum()) + float(t.double().abs().sum()) for t in model.state_dict().values()]
        return joblib.hash((type(value).__name__, getattr(value, "model_id", None), sums))
    return joblib.hash(value)


def _params(head) -> dict[str, str]:
    return {key: _fingerprint(value) for key, value in head.get_params(deep=False).items()}


# The properties, each a function of a head factory or a fitted head and the data; every one is shown to fail on a
# head with the matching flaw (test_each_property_catches_its_flaw).

def check_fit_keeps_params(make, X, y, X_test):
    head = make()
    before, public_before = _params(head), {key for key in vars(head) if not key.startswith("_")}
    assert _fit(head, X, y) is head
    assert _params(head) == before, "fit changed a parameter"
    added = {key for key in vars(head) if not key.startswith("_")} - public_before
    assert all(key.endswith("_") for key in added), f"fit set public attributes {sorted(added)} without a trailing _"
    assert head.n_features_in_ == X.shape[1]


def check_clone_and_refit(make, X, y, X_test, fitted=None):
    fitted = _fit(make(), X, y) if fitted is None else fitted
    twice = clone(clone(fitted))
    assert type(twice) is type(fitted) and _params(twice) == _params(fitted)
    with pytest.raises(NotFittedError):
        check_is_fitted(twice)
    expected = _outputs(fitted, X_test)
    _assert_same_outputs(_outputs(_fit(twice, X, y), X_test), expected)
    _assert_same_outputs(_outputs(_fit(twice, X, y), X_test), expected)  # fitting again: the same head


def check_order_invariance(fitted, X_test):
    order = np.random.default_rng(1).permutation(len(X_test))
    expected = {method: value[order] for method, value in _outputs(fitted, X_test).items()}
    _assert_same_outputs(_outputs(fitted, X_test[order]), expected)


def check_pickle(fitted, X_test):
    restored = pickle.loads(pickle.dumps(fitted))
    assert type(restored) is type(fitted) and _params(restored).keys() == _params(fitted).keys()
    _assert_same_outputs(_outputs(restored, X_test), _outputs(fitted, X_test), rtol=0, atol=0)


def check_input_kinds(make, X, y, X_test, folder, fitted=None):
    """float64, read-only, memory-mapped and Fortran-ordered input: the same head and answers as float32."""
    expected = _outputs(_fit(make(), X, y) if fitted is None else fitted, X_test)
    readonly = X.copy()
    readonly.flags.writeable = False
    np.save(folder / "x.npy", X)
    for variant in (X.astype(np.float64), readonly, np.load(folder / "x.npy", mmap_mode="r"), np.asfortranarray(X)):
        y_readonly = y.copy()
        y_readonly.flags.writeable = False
        test = X_test.astype(variant.dtype)
        test.flags.writeable = False
        _assert_same_outputs(_outputs(_fit(make(), variant, y_readonly), test), expected)


def check_subset_invariance(fitted, X_test):
    full = _outputs(fitted, X_test)
    for rows in (slice(0, 1), slice(1, 5), slice(5, None)):
        _assert_same_outputs(_outputs(fitted, X_test[rows]), {m: v[rows] for m, v in full.items()})


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_fit_changes_no_parameter_and_adds_only_fitted_state(entry):
    check_fit_keeps_params(lambda: _build(entry), *_data(entry.name))
    np.testing.assert_array_equal(_fitted(entry.name).classes_, np.arange(len(NAMES)))


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_clone_is_idempotent_and_a_refit_gives_the_same_head(entry):
    check_clone_and_refit(lambda: _build(entry), *_data(entry.name), fitted=_fitted(entry.name))


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_predictions_follow_a_permutation_of_the_rows(entry):
    check_order_invariance(_fitted(entry.name), _data(entry.name)[2])


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_a_pickled_fitted_head_gives_the_same_answers(entry):
    check_pickle(_fitted(entry.name), _data(entry.name)[2])


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_float64_read_only_and_memory_mapped_input_give_the_same_head(entry, tmp_path):
    check_input_kinds(lambda: _build(entry), *_data(entry.name), tmp_path, fitted=_fitted(entry.name))


def _subset_params(entry) -> list:
    marks = []
    reason = _skips(entry).get("cliplab_subset_invariance")
    if reason:  # a declared waiver must still be needed: a strict expected failure
        marks.append(pytest.mark.xfail(reason=reason, strict=True, raises=AssertionError))
    return [pytest.param(entry, id=entry.name, marks=marks)]


@pytest.mark.parametrize("entry", [p for e in ENTRIES for p in _subset_params(e)])
def test_a_rows_logits_do_not_depend_on_the_rows_scored_with_it(entry):
    check_subset_invariance(_fitted(entry.name), _data(entry.name)[2])


PER_IMAGE = [e for e in ENTRIES if getattr(e, "per_image", None)]


@pytest.mark.skipif(not PER_IMAGE, reason="no head declares per-image parameters")
@pytest.mark.parametrize("entry", PER_IMAGE, ids=[e.name for e in PER_IMAGE])
def test_the_per_image_parameters_make_a_head_subset_invariant(entry):
    X, y, X_test = _data(entry.name)
    check_subset_invariance(_fit(_build(entry, **entry.per_image), X, y), X_test)


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_declared_waivers_are_known_properties_with_reasons(entry):
    for name, reason in _skips(entry).items():
        if not name.startswith("check_"):
            assert name in WAIVABLE, f"{entry.name} waives {name!r}; known: {sorted(WAIVABLE)}"
        assert isinstance(reason, str) and len(reason.split()) >= 3, f"{entry.name}: {name} needs a reason"


class _Flawed(ClipHead):
    """Nearest class mean with one chosen flaw: what each property must catch."""

    def __init__(self, flaw: str = "none", scale: float = 10.0):
        self.flaw = flaw
        self.scale = scale

    def fit(self, X, y):
        if self.flaw == "writes-input":
            np.asarray(X)[:0] *= 1  # an in-place write: refused on read-only input
        given = np.asarray(X).dtype
        X, y = self._validate(X, y, reset=True)
        self.classes_ = np.unique(y)
        self.means_ = np.stack([X[y == c].mean(axis=0) for c in self.classes_])
        if self.flaw == "changes-param":
            self.scale = self.scale * 2
        if self.flaw == "public-state":
            self.means = self.means_
        if self.flaw == "unseeded":
            self.means_ = self.means_ + np.random.default_rng().normal(size=self.means_.shape)
        if self.flaw == "unpicklable":
            self.norm_ = lambda v: v
        if self.flaw == "float64-differs" and given != np.float32:
            self.means_ = -self.means_
        return self

    def logits(self, X):
        X = self._checked(X)
        out = self.scale * X @ self.means_.T
        if self.flaw == "batch":  # scores rescaled over the rows scored together
            out = out - out.mean(axis=0)
        if self.flaw == "row-order":
            out = out + np.arange(len(X))[:, None]
        return out


FLAWS = {  # flaw -> (the property that must catch it, how it shows)
    "changes-param": (check_fit_keeps_params, AssertionError), "public-state": (check_fit_keeps_params, AssertionError),
    "unseeded": (check_clone_and_refit, AssertionError), "row-order": (check_order_invariance, AssertionError),
    "unpicklable": (check_pickle, (AttributeError, pickle.PicklingError)),
    "writes-input": (check_input_kinds, ValueError), "float64-differs": (check_input_kinds, AssertionError),
    "batch": (check_subset_invariance, AssertionError),
}


@pytest.mark.parametrize("flaw", FLAWS)
def test_each_property_catches_its_flaw(flaw, tmp_path):
    X, y, X_test = _data("ncm")
    check, error = FLAWS[flaw]

    def run(name):
        make = partial(_Flawed, flaw=name)
        if check in (check_fit_keeps_params, check_clone_and_refit):
            return check(make, X, y, X_test)
        if check is check_input_kinds:
            return check(make, X, y, X_test, tmp_path)
        return check(make().fit(X, y), X_test)

    run("none")  # the sound head passes
    with pytest.raises(error):
        run(flaw)
