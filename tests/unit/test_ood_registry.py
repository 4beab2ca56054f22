"""OOD scores as plugins: the registry, written-out formulas against the plugin path, any score on any head (library
and command line), and every refusal before a single image is embedded."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cliplab.data import load_dataset
from cliplab.errors import CliplabError, DenseFeaturesUnavailableError
from cliplab.eval.ood import evaluate_ood, score_params
from cliplab.features import class_weights, embed_images
from cliplab.heads import create_head
from cliplab.ood import create_score, list_scores, ood_metrics, register_score
from cliplab.ood.base import OODScore, ScoreContext, ScoreInputs


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _unit(a, axis):
    return a / np.linalg.norm(a, axis=axis, keepdims=True)


def _plugin(name, context=None, **params):
    score = create_score(name, **params)
    score.setup(context or ScoreContext(backbone=None, class_names=[]))
    return score


# -- the registry -------------------------------------------------------------------------------------------------
def test_every_existing_score_is_registered_with_its_needs_and_parameters():
    entries = {e.name: e for e in list_scores()}
    expected = {"msp": ({"logits"}, ()), "max-logit": ({"logits"}, ()),
                "energy": ({"logits"}, (("temperature", 1.0),)),
                "mcm": ({"features", "text_weights"}, (("temperature", 1.0),)),
                "glmcm": ({"features", "text_weights", "patch_grids"},
                          (("temperature", 1.0), ("lambda_local", 1.0), ("local_path", "final"))),
                "cooked": ({"features", "fit_data"}, (("statistic", "entropy"),)),
                "clipn-ctw": ({"features", "artefact"}, ()), "clipn-atd": ({"features", "artefact"}, ())}
    for name, (needs, params) in expected.items():
        assert entries[name].needs == needs and entries[name].params == params, name


def test_register_refuses_unknown_needs_and_parameters_without_defaults(monkeypatch):
    from cliplab.ood import registry

    registry.load_all()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    with pytest.raises(CliplabError, match="unknown needs \\['pixels'\\]"):
        register_score("x", needs=("pixels",))(type("X", (OODScore,), {}))

    class NoDefault(OODScore):
        def __init__(self, alpha):
            self.alpha = alpha

    with pytest.raises(CliplabError, match="keyword arguments with defaults"):
        register_score("y")(NoDefault)
    with pytest.raises(CliplabError, match="already registered"):
        register_score("msp")(type("Other", (OODScore,), {}))


def test_score_params_go_to_the_scores_that_take_them():
    routed = score_params(["msp", "energy", "mcm", "glmcm"], {"temperature": 2.0, "mcm.temperature": 0.5,
                                                             "lambda_local": 0.3})
    assert routed == {"msp": {}, "energy": {"temperature": 2.0}, "mcm": {"temperature": 0.5},
                      "glmcm": {"temperature": 2.0, "lambda_local": 0.3}}
    with pytest.raises(CliplabError, match="no chosen score takes it"):
        score_params(["msp", "mcm"], {"lambda_local": 1.0})
    with pytest.raises(CliplabError, match="'energy' is not a chosen score"):
        score_params(["msp"], {"energy.temperature": 1.0})
    with pytest.raises(CliplabError, match="msp takes no parameters"):
        score_params(["msp"], {"msp.temperature": 1.0})


# -- the plugin path equals the formulas written out (what eval/ood.py computed before the move) -------------------
def test_plugins_equal_the_written_out_formulas_on_the_same_features():
    rng = np.random.default_rng(3)
    n, p, d, c = 9, 6, 8, 5
    x, local, w = rng.normal(size=(n, d)), rng.normal(size=(n, p, d)), rng.normal(size=(d, c))
    logits = 30 * _unit(x, 1) @ _unit(w, 0)
    context = ScoreContext(backbone=None, class_names=list("abcde"), text_weights=w)
    inputs = ScoreInputs("part", x, logits=logits, local_features=local)
    cos = _unit(x, 1) @ _unit(w, 0)
    local_cos = _unit(local, 2) @ _unit(w, 0)
    for T, lam in ((1.0, 1.0), (0.3, 0.5)):
        want = {
            ("msp", ()): _softmax(logits).max(1),
            ("max-logit", ()): logits.max(1),
            ("energy", (("temperature", T),)): T * np.log(np.exp(logits / T).sum(1)),
            ("mcm", (("temperature", T),)): _softmax(cos / T).max(1),
            ("glmcm", (("temperature", T), ("lambda_local", lam))):
                _softmax(cos / T).max(1) + lam * _softmax(local_cos / T).max(axis=(1, 2)),
        }
        for (name, params), expected in want.items():
            got = _plugin(name, context, **dict(params)).score(inputs)
            np.testing.assert_allclose(got, expected, rtol=1e-10, err_msg=name)


# -- any score on any head ------------------------------------------------------------------------------------------
def _split_folders(root):
    rng = np.random.default_rng(1)
    for split, count in (("train", 6), ("val", 3), ("test", 4)):
        for cls, base in (("cat", 40), ("dog", 200)):
            (root / "id" / split / cls).mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(base + rng.normal(0, 30, (24, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / "id" / split / cls / f"{i}.png")
    (root / "ood").mkdir()
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / "ood" / f"{i}.png")
    return root / "id", root / "ood"


@pytest.fixture
def split_data(tmp_path):
    id_dir, ood_dir = _split_folders(tmp_path)
    test, train, val = (load_dataset(id_dir, split=s) for s in ("test", "train", "val"))
    return id_dir, ood_dir, test, train, val, load_dataset(ood_dir)


def _probe(tiny, train, val, cache):
    t, v = embed_images(tiny, train, cache).labelled(), embed_images(tiny, val, cache).labelled()
    return create_head("linear-probe").fit(t.features, t.labels, X_val=v.features, y_val=v.labels)


def test_logit_scores_read_the_chosen_head_fitted_on_train_and_val(tiny, split_data, tmp_path):
    _, _, test, train, val, ood = split_data
    cache = tmp_path / "cache"
    report = evaluate_ood(tiny, test, [ood], ["msp", "energy", "mcm"], "generic", head="linear-probe",
                          fit_datasets=(train, val), cache_dir=cache, params={"temperature": 0.5})
    probe = _probe(tiny, train, val, cache)
    w = class_weights(tiny, test.class_names, "generic", cache_dir=cache)
    for part, data in (("id", test), ("ood", ood)):
        x = embed_images(tiny, data, cache).features
        np.testing.assert_allclose(report.scores["msp"][part], _softmax(probe.logits(x)).max(1), rtol=1e-10)
        energy = 0.5 * np.log(np.exp(probe.logits(x) / 0.5).sum(1))
        np.testing.assert_allclose(report.scores["energy"][part], energy, rtol=1e-10)
        np.testing.assert_allclose(report.scores["mcm"][part], _softmax(_unit(x, 1) @ w / 0.5).max(1), rtol=1e-6)
    x = embed_images(tiny, test, cache)
    assert report.record["metrics"]["id_accuracy"] == pytest.approx(np.mean(probe.predict(x.features) == x.labels))
    assert report.record["cliplab"]["method"] == "linear-probe"
    assert report.record["cliplab"]["score_params"] == {"msp": {}, "energy": {"temperature": 0.5},
                                                        "mcm": {"temperature": 0.5}}
    assert report.record["cliplab"]["text_weights"] == "templates"  # the probe declares no class weights


def test_text_weights_are_the_heads_class_weights_where_it_declares_them(tiny, split_data, tmp_path):
    from cliplab.ood import mcm

    _, _, test, train, val, ood = split_data
    cache = tmp_path / "cache"
    report = evaluate_ood(tiny, test, [ood], ["mcm"], "generic", head="ncm", fit_datasets=(train, val),
                          cache_dir=cache)
    t = embed_images(tiny, train, cache).labelled()
    ncm = create_head("ncm").fit(t.features, t.labels)  # gives=("class_weights",): its class means
    x = embed_images(tiny, test, cache).features
    np.testing.assert_allclose(report.scores["mcm"]["id"], mcm(x, ncm.weights_), rtol=1e-6)
    assert report.record["cliplab"]["text_weights"] == "head"


def test_everything_a_score_lacks_is_refused_before_any_image_is_embedded(tiny, split_data, monkeypatch):
    import cliplab.eval.ood as ood_eval
    import cliplab.eval.robustness as robustness_eval

    _, _, test, train, val, ood = split_data

    def no_embedding(*args, **kwargs):
        raise AssertionError("an image was embedded before the refusal")

    monkeypatch.setattr(ood_eval, "embed_images", no_embedding)
    monkeypatch.setattr(robustness_eval, "embed_images", no_embedding)
    cases = [
        (dict(scores=["cooked"]), "'cooked' fits on the ID data"),
        (dict(scores=["clipn-atd"]), "'clipn-atd' needs an artefact \\(the folder of a trained CLIPN"),
        (dict(scores=["msp"], head="linear-probe"), "'linear-probe' fits on the ID train split"),
        (dict(scores=["nosuch"]), "unknown OOD score 'nosuch'"),
        (dict(scores=["msp"], params={"temperature": 2.0}), "no chosen score takes it"),
        (dict(scores=["energy"], params={"energy.T": 2.0}), "energy takes temperature"),
    ]
    for kwargs, message in cases:
        with pytest.raises(CliplabError, match=message) as info:
            evaluate_ood(tiny, test, [ood], templates="generic", **kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(CliplabError, match="'cooked' fits on the ID data"):
        robustness_eval.evaluate_robustness(tiny, test, "generic", ood=ood, score="cooked", corruptions=["contrast"])
    with pytest.raises(CliplabError, match="'linear-probe' fits on the ID train split"):
        robustness_eval.evaluate_robustness(tiny, test, "generic", head="linear-probe", corruptions=["contrast"])

    with pytest.raises(CliplabError, match="dense path must be one of"):
        evaluate_ood(tiny, test, [ood], ["msp", "glmcm"], "generic", params={"local_path": "nosuch"})

    def no_patches(backbone):
        raise DenseFeaturesUnavailableError("this image tower gives no patch tokens")

    import cliplab.models.dense

    monkeypatch.setattr(cliplab.models.dense, "dense_tower", no_patches)
    with pytest.raises(DenseFeaturesUnavailableError, match="no patch tokens"):
        evaluate_ood(tiny, test, [ood], ["msp", "glmcm"], "generic")


def test_robustness_takes_any_head_and_score(tiny, split_data, tmp_path):
    from cliplab.data.corruptions import CorruptedDataset
    from cliplab.eval.robustness import evaluate_robustness

    _, _, test, train, val, ood = split_data
    cache = tmp_path / "cache"
    report = evaluate_robustness(tiny, test, "generic", head="linear-probe", score="energy", ood=ood,
                                 fit_datasets=(train, val), corruptions=["contrast"], severities=[5], limit=None,
                                 cache_dir=cache, progress=False, num_workers=0, params={"temperature": 2.0})
    probe = _probe(tiny, train, val, cache)
    for row in report.rows:
        view, ood_view = (test, ood) if row["corruption"] == "clean" else (
            CorruptedDataset(test, "contrast", 5, 0), CorruptedDataset(ood, "contrast", 5, 0))
        x = embed_images(tiny, view, cache, progress=False, num_workers=0)
        o = embed_images(tiny, ood_view, cache, progress=False, num_workers=0).features
        assert row["acc1"] == pytest.approx(np.mean(probe.predict(x.features) == x.labels))
        energy = [2.0 * np.log(np.exp(probe.logits(f) / 2.0).sum(1)) for f in (x.features, o)]
        assert row["auroc"] == pytest.approx(ood_metrics(*energy)["auroc"])
    assert report.record["cliplab"]["method"] == "linear-probe"
    assert report.record["cliplab"]["ood_score"] == "energy"
    assert report.record["cliplab"]["ood_score_params"] == {"temperature": 2.0}


def test_command_line_runs_a_saved_head_or_a_method(tiny, split_data, tmp_path):
    from cliplab.cli.app import app
    from cliplab.heads.saving import save_head

    id_dir, ood_dir, test, train, val, ood = split_data
    cache = tmp_path / "cache"
    probe = _probe(tiny, train, val, cache)
    save_head(probe, tmp_path / "head", model_id=tiny.model_id, class_names=list(test.class_names))
    common = ["ood", "--model", "tiny", "--device", "cpu", "--id", str(id_dir), "--split", "test", "--ood",
              str(ood_dir), "--cache-dir", str(cache), "-q", "--workers", "0"]
    expected = {}
    for part, data in (("id", test), ("ood", ood)):
        expected[part] = _softmax(probe.logits(embed_images(tiny, data, cache).features)).max(1)
    want = ood_metrics(expected["id"], expected["ood"])
    for how in (["--head", str(tmp_path / "head")], ["--method", "linear-probe"]):
        out = tmp_path / how[0].strip("-")
        result = CliRunner().invoke(app, [*common, *how, "--scores", "msp,max-logit", "-o", str(out)])
        assert result.exit_code == 0, result.output
        (path,) = out.glob("ood_*.json")
        got = json.loads(path.read_text())["metrics"]["ood"]["msp"]["ood"]
        assert got == pytest.approx(want), how
    both = CliRunner().invoke(app, [*common, "--head", str(tmp_path / "head"), "--method", "ncm"])
    assert both.exit_code == 2 and "not both" in both.output
    unused = CliRunner().invoke(app, [*common, "--scores", "msp", "--lambda-local", "0.5"])
    assert unused.exit_code == 2 and "no chosen score takes it" in unused.output


def test_ood_package_exports_what_it_did_lazily():
    import cliplab.ood as ood
    from cliplab.ood import clipn, gl_mcm, metrics, scores

    ood.load_all()  # importing every score module must not shadow a function by its module's name

    for name, module in (("atd", clipn), ("atd_score", clipn), ("ctw", clipn), ("ctw_score", clipn),
                         ("glmcm", gl_mcm), ("local_mcm", gl_mcm), ("FPR_CONVENTIONS", metrics),
                         ("fpr_at_tpr", metrics), ("ood_metrics", metrics), ("threshold_at_tpr", metrics),
                         ("energy", scores), ("max_logit", scores), ("mcm", scores), ("msp", scores)):
        assert getattr(ood, name) is getattr(module, name), name
        assert name in ood.__all__


def test_glmcm_reads_patch_grids_from_the_dense_cache_and_a_rerun_computes_none(tiny, split_data, tmp_path,
                                                                                 monkeypatch):
    import torch

    import cliplab.features.dense as dense
    from cliplab.features.dense import DenseSpec, embed_dense
    from cliplab.ood import glmcm

    _, _, test, _, _, ood = split_data
    cache = tmp_path / "cache"
    first = evaluate_ood(tiny, test, [ood], ["glmcm"], "generic", cache_dir=cache, params={"lambda_local": 0.5})
    w = class_weights(tiny, test.class_names, "generic", cache_dir=cache)
    x = embed_images(tiny, test, cache)
    images = torch.stack([tiny.preprocess(test.load_image(int(i))) for i in x.indices])
    direct = glmcm(x.features, tiny.dense_features(images).numpy(), w, lambda_local=0.5)  # the path before the cache
    np.testing.assert_allclose(first.scores["glmcm"]["id"], direct, rtol=1e-6)
    value_tokens = embed_dense(tiny, test, cache, spec=DenseSpec(path="value"), progress=False).tokens
    value = evaluate_ood(tiny, test, [ood], ["glmcm"], "generic", cache_dir=cache,
                         params={"lambda_local": 0.5, "local_path": "value"})
    np.testing.assert_allclose(value.scores["glmcm"]["id"], glmcm(x.features, value_tokens, w, lambda_local=0.5),
                               rtol=1e-6)
    assert not np.allclose(value.scores["glmcm"]["id"], direct)

    def no_extraction(*args, **kwargs):
        raise AssertionError("patch tokens were extracted again")

    monkeypatch.setattr(dense, "dense_tokens", no_extraction)
    monkeypatch.setattr(tiny, "dense_features", no_extraction)
    again = evaluate_ood(tiny, test, [ood], ["glmcm"], "generic", cache_dir=cache, params={"lambda_local": 0.5})
    for part in ("id", "ood"):
        np.testing.assert_array_equal(again.scores["glmcm"][part], first.scores["glmcm"][part])


def test_command_line_clipn_scores_read_the_artefact_folder(tiny, split_data, tmp_path):
    import torch

    from cliplab.cli.app import app
    from cliplab.ood import atd_score
    from cliplab.train.clipn import ClipnModel, clipn_probabilities

    id_dir, ood_dir, test, _, _, ood = split_data
    cache = tmp_path / "cache"
    clipn = ClipnModel.init(tiny, n_prompts=2)
    with torch.no_grad():  # a "no" encoder that differs from CLIP's text tower, as after training
        clipn.prompts.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    clipn.save(tmp_path / "clipn")
    args = ["ood", "--model", "tiny", "--device", "cpu", "--id", str(id_dir), "--split", "test", "--ood",
            str(ood_dir), "--cache-dir", str(cache), "-q", "--workers", "0", "--scores", "clipn-atd", "-t", "generic"]
    refused = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "a")])
    assert refused.exit_code == 2 and "--artefact FOLDER" in refused.output and not (tmp_path / "a").exists()
    result = CliRunner().invoke(app, [*args, "--artefact", str(tmp_path / "clipn"), "-o", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    scores = [atd_score(*clipn_probabilities(clipn, embed_images(tiny, d, cache).features, test.class_names,
                                             "generic")) for d in (test, ood)]
    (path,) = (tmp_path / "b").glob("ood_*.json")
    got = json.loads(path.read_text())["metrics"]["ood"]["clipn-atd"]["ood"]
    assert got == pytest.approx(ood_metrics(*scores))
