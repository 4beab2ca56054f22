"""Explanations: every prompt's contribution, summing exactly to its class's logit; ``cliplab explain`` and the
``--descriptions`` options of ``classify`` and ``zeroshot``."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cliplab.cli.app import app
from cliplab.data import image_files
from cliplab.errors import CliplabError
from cliplab.eval.explain import explain
from cliplab.features import embed_images
from cliplab.heads import create_head

NAMES = ["cat", "dog", "bird"]
DESCRIPTIONS = {"cat": ["pointed ears", "whiskers", "a long tail"], "dog": ["floppy ears", "a wet nose"],
                "bird": ["feathers", "a beak", "wings", "has two legs"]}
CUPL = {"cat": ["A cat is a small furry pet.", "A photo of a cat sleeping."], "dog": ["A dog wags its tail."],
        "bird": ["A bird has feathers.", "A small bird on a branch.", "Birds fly."]}


@pytest.fixture()
def features(tiny):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, tiny.embed_dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("method, params", [
    ("zeroshot", {"templates": ["a photo of a {c}.", "a {c}.", "art of the {c}."]}),
    ("dclip", {"descriptions": DESCRIPTIONS}),
    ("cupl", {"descriptions": CUPL}),
    ("cupl", {"descriptions": CUPL, "templates": ["a photo of a {c}."]}),
])
def test_contributions_sum_to_each_top_class_logit(tiny, tmp_path, features, method, params):
    head = create_head(method, backbone=tiny, class_names=NAMES, cache_dir=tmp_path, **params).fit()
    for x in features:
        logits = head.logits(x[None])[0]
        found = explain(head, x, top=3)
        assert [e.label for e in found] == [NAMES[c] for c in np.argsort(-logits)]
        for e in found:
            assert np.sum(e.contributions) == pytest.approx(e.logit, rel=1e-4, abs=1e-5)
            assert e.logit == pytest.approx(float(logits[NAMES.index(e.label)]), rel=1e-6)
            assert len(e.prompts) == len(head.sentences()[NAMES.index(e.label)])


def test_dclip_contribution_is_scaled_similarity_to_the_descriptor_sentence(tiny, tmp_path, features):
    head = create_head("dclip", backbone=tiny, class_names=NAMES, descriptions=DESCRIPTIONS, cache_dir=tmp_path).fit()
    e = explain(head, features[0], top=1)[0]
    c = NAMES.index(e.label)
    sentences = [f"{e.label}, which has {d}" if not d.startswith(("a ", "has ")) else None
                 for d in DESCRIPTIONS[e.label]]
    text = tiny.encode_texts(head.sentences()[c]).numpy()
    expected = head.logit_scale_ * (text @ features[0]) / len(text)
    np.testing.assert_allclose(e.contributions, expected, rtol=1e-4, atol=1e-6)
    assert any(s is not None and s in e.prompts for s in sentences)  # the descriptor phrased as DCLIP does


def test_explain_refuses_a_head_without_prompts(tiny, features):
    head = create_head("ncm").fit(features, np.array([0, 1, 2, 0]))
    with pytest.raises(CliplabError, match="cannot explain"):
        explain(head, features[0])


runner = CliRunner()


@pytest.fixture()
def pictures(tmp_path):
    rng = np.random.default_rng(3)
    paths = []
    for i in range(2):
        path = tmp_path / f"pic{i}.png"
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    file = tmp_path / "descriptors.json"
    file.write_text(json.dumps(DESCRIPTIONS))
    return paths, file


def test_cli_explain_writes_png_and_json_whose_contributions_sum_to_logits(pictures, tmp_path):
    paths, file = pictures
    out = tmp_path / "why"
    result = runner.invoke(app, ["explain", *map(str, paths), "--labels", ",".join(NAMES), "--descriptions",
                                 str(file), "--model", "tiny", "-q", "--top", "2", "-o", str(out),
                                 "--cache-dir", str(tmp_path / "c")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "which has" in result.output and "contribution" in result.output
    for path in paths:
        assert (out / f"explain_{path.stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        record = json.loads((out / f"explain_{path.stem}.json").read_text())
        assert record["method"] == "dclip" and record["weights"] == "random" and len(record["classes"]) == 2
        for cls in record["classes"]:
            assert len(cls["prompts"]) == len(DESCRIPTIONS[cls["label"]])
            assert sum(p["contribution"] for p in cls["prompts"]) == pytest.approx(cls["logit"], rel=1e-4)


def test_classify_with_descriptions_equals_the_dclip_head(pictures, tmp_path, tiny):
    paths, file = pictures
    result = runner.invoke(app, ["classify", *map(str, paths), "--labels", ",".join(NAMES), "--descriptions",
                                 str(file), "--model", "tiny", "-q", "-o", str(tmp_path / "p.json"), "-k", "3",
                                 "--cache-dir", str(tmp_path / "c")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "p.json").read_text())
    head = create_head("dclip", backbone=tiny, class_names=NAMES, descriptions=file, cache_dir=tmp_path / "c").fit()
    features = embed_images(tiny, image_files(paths), tmp_path / "c2", progress=False)
    probs = dict(zip(features.item_ids, head.predict_proba(features.features)))
    assert len(rows) == len(paths)
    for row in rows:
        p = probs[row["path"]]
        assert [q["label"] for q in row["predictions"]] == [NAMES[c] for c in np.argsort(-p)]
        np.testing.assert_allclose([q["probability"] for q in row["predictions"]], np.sort(p)[::-1], rtol=1e-4)


def test_descriptions_with_a_method_that_takes_none_is_one_line(pictures):
    paths, file = pictures
    result = runner.invoke(app, ["classify", str(paths[0]), "--labels", "a,b", "--descriptions", str(file),
                                 "--method", "ncm", "--model", "tiny"])
    assert result.exit_code == 2 and "takes no --descriptions" in result.output


def test_zeroshot_with_descriptions_runs_dclip_with_its_own_template(tmp_path):
    root = tmp_path / "data"
    rng = np.random.default_rng(1)
    for cls in NAMES:
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    file = tmp_path / "d.json"
    file.write_text(json.dumps(DESCRIPTIONS))
    result = runner.invoke(app, ["zeroshot", "--dataset", str(root), "--descriptions", str(file), "--model", "tiny",
                                 "-q", "-o", str(tmp_path / "out")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    record = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert record["cliplab"]["method"] == "dclip"
    assert list(record["cliplab"]["params"]["templates"]) == ["{c}"]  # DCLIP's own, not the dataset's templates
