"""Every registered head passes scikit-learn's estimator checks; checks that cannot apply are skipped by name."""

import tempfile

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.utils.estimator_checks import parametrize_with_checks

from cliplab.heads import create_head, list_heads
from cliplab.models import load_model

TINY = load_model("tiny", device="cpu")
CACHE = tempfile.mkdtemp(prefix="cliplab-head-checks-")

# The zero-shot head's feature width is fixed by its text encoder (64 for tiny); these checks fit or
# predict on 1 to 10 random features, which it rightly refuses as features of another model.
FIXED_WIDTH = "feature width is fixed by the model's text embeddings; the check feeds 1-10 random features"
ZEROSHOT_SKIPS = {name: FIXED_WIDTH for name in (
    "check_fit_score_takes_y", "check_estimators_overwrite_params", "check_dont_overwrite_parameters",
    "check_estimators_fit_returns_self", "check_readonly_memmap_input", "check_n_features_in_after_fitting",
    "check_positive_only_tag_during_fit", "check_estimators_dtypes", "check_dtype_object", "check_pipeline_consistency",
    "check_estimators_nan_inf", "check_estimators_pickle", "check_f_contiguous_array_estimator",
    "check_classifier_data_not_an_array", "check_classifiers_classes", "check_classifiers_train",
    "check_supervised_y_2d", "check_decision_proba_consistency", "check_methods_sample_order_invariance",
    "check_methods_subset_invariance", "check_fit2d_1sample", "check_fit2d_1feature", "check_dict_unchanged",
    "check_fit_idempotent", "check_fit_check_is_fitted", "check_n_features_in", "check_fit2d_predict1d",
    "check_requires_y_none",
)} | {
    "check_classifiers_one_label": "zero-shot takes its classes from class_names, not from y",
    "check_classifiers_regression_target": "zero-shot ignores y (it needs no training labels)",
}
SKIPS = {"zeroshot": ZEROSHOT_SKIPS}
# GDA adds CLIP's zero-shot logits (text weights fixed at the model's width) and takes labels as class indices
# into class_names, like the zero-shot head.
LABELS_ARE_INDICES = "labels are integer class indices into class_names; the check fits on float or string labels"
SKIPS["gda"] = {name: FIXED_WIDTH for name in ZEROSHOT_SKIPS if name not in (
    "check_classifiers_regression_target", "check_requires_y_none")} | {name: LABELS_ARE_INDICES for name in (
    "check_classifiers_one_label", "check_dtype_object", "check_classifiers_classes", "check_estimators_nan_inf")}

# CapS-Adapter adds CLIP's zero-shot logits (fixed width), takes labels as class indices, scores every class of
# class_names, and min-max rescales its KL term over all rows scored together (transductive, as the authors' code).
SKIPS["caps-adapter"] = {name: FIXED_WIDTH for name in ZEROSHOT_SKIPS if name not in (
    "check_classifiers_regression_target", "check_requires_y_none")} | {name: LABELS_ARE_INDICES for name in (
    "check_dtype_object", "check_classifiers_classes", "check_estimators_nan_inf")} | {
    "check_classifiers_one_label": "classes_ are all of class_names (the zero-shot logits score every class)",
    "check_methods_subset_invariance": "the KL term is min-max rescaled over all rows scored together (the "
                                       "method's transductive scaling, as in the authors' code)",
}

# Tip-Adapter(-F) add CLIP's zero-shot logits (fixed width) and take labels as class indices into class_names.
SKIPS["tip-adapter"] = SKIPS["tip-adapter-f"] = {name: FIXED_WIDTH for name in ZEROSHOT_SKIPS if name not in (
    "check_classifiers_regression_target", "check_requires_y_none")} | {name: LABELS_ARE_INDICES for name in (
    "check_classifiers_one_label", "check_dtype_object", "check_classifiers_classes", "check_estimators_nan_inf")}


# COOkeD averages CLIP's zero-shot probabilities (fixed width) and takes labels as class indices into class_names.
SKIPS["cooked"] = {name: FIXED_WIDTH for name in ZEROSHOT_SKIPS if name not in (
    "check_classifiers_regression_target", "check_requires_y_none")} | {name: LABELS_ARE_INDICES for name in (
    "check_classifiers_one_label", "check_dtype_object", "check_classifiers_classes", "check_estimators_nan_inf")} | {
    "check_non_transformer_estimators_n_iter": FIXED_WIDTH}

# AMU-Tuning takes [CLIP | auxiliary] features: wider than the model's embeddings (the CLIP block is fixed by the
# text weights, an auxiliary block must follow), and labels as class indices into class_names.
AUX_BLOCK = "features are [CLIP | auxiliary]: wider than the model's 64-d embeddings; the check feeds 1-10 features"
SKIPS["amu"] = {name: AUX_BLOCK for name in ZEROSHOT_SKIPS if name not in (
    "check_classifiers_regression_target", "check_requires_y_none")} | {name: LABELS_ARE_INDICES for name in (
    "check_classifiers_one_label", "check_dtype_object", "check_classifiers_classes", "check_estimators_nan_inf")}

# DCLIP and CuPL are zero-shot heads (class weights from descriptions or templates): the zero-shot head's skips.
SKIPS["dclip"] = SKIPS["cupl"] = ZEROSHOT_SKIPS
# REAL-Prompt and REAL-Linear (paper 36) are zero-shot heads by default construction (no corpus): the same skips.
SKIPS["real"] = SKIPS["real-linear"] = ZEROSHOT_SKIPS
# WaffleCLIP's control is a zero-shot head (random descriptors); desc-select (paper 30) fits on a labelled selection
# set but scores text weights fixed at the model's width and takes labels as class indices, like GDA.
SKIPS["waffle"] = ZEROSHOT_SKIPS
SKIPS["desc-select"] = SKIPS["gda"]
# FuDD (paper 10; default llm=None: the template classifier) and PerceptionCLIP (paper 21; text weights for every
# class x context) are zero-shot heads whose width is fixed by the model's text embeddings: the zero-shot skips.
SKIPS["fudd"] = SKIPS["perceptionclip"] = ZEROSHOT_SKIPS


def _build(entry):
    extra = {"cache_dir": CACHE, "templates": ["a photo of a {c}."]} if entry.needs_backbone else {}
    return create_head(entry.name, backbone=TINY if entry.needs_backbone else None, class_names=["a", "b", "c"],
                       **extra)


HEADS = [_build(entry) for entry in list_heads()]


def _expected_failures(head):
    return SKIPS.get(head._registered_name, {})


@parametrize_with_checks(HEADS, expected_failed_checks=_expected_failures)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_every_registered_head_is_checked():
    assert {type(h) for h in HEADS} == {e.cls for e in list_heads()} and len(HEADS) >= 2


@pytest.mark.parametrize("head", HEADS, ids=lambda h: h._registered_name)
def test_two_classes_give_a_margin_and_full_logits(head):
    X = np.eye(TINY.embed_dim, dtype=np.float32)[:8]
    y = np.array([0, 1] * 4)
    if "class_names" in head.get_params():  # a head over named classes: two of them here
        head = clone(head).set_params(class_names=["a", "b"], templates=["{c}"])
    if "aux_model" in head.get_params():  # AMU-Tuning: CLIP features followed by an auxiliary model's
        X = np.hstack([X, X])
    head.fit(X, y)
    logits = head.logits(X)
    assert logits.shape == (8, 2)
    np.testing.assert_allclose(head.decision_function(X), logits[:, 1] - logits[:, 0], rtol=1e-6)
