"""One method name, one classifier: every registered method gives the same numbers through `cliplab evaluate`
and `cliplab fewshot` (same shots, seed and split), `classify --method M` builds what `zeroshot --method M`
builds, and the help texts that list methods or parameters name only registered ones."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from _llm_stub import Stub
from cliplab.cli.app import app
from cliplab.heads import create_head, list_heads
from cliplab.heads.registry import method_names

runner = CliRunner()
CLASSES = ("apple", "pear")
PAIR_ANSWER = json.dumps({"differences": [
    {"attribute": "shape", "first": "a photo of a round fruit.", "second": "a photo of a bell-shaped fruit."},
]})
# small settings where a method's defaults would be slow on a 2-core CI machine; inputs for those that need them
PARAMS = {
    "amu": {"aux_model": "tiny", "epochs": 2},
    "caps-adapter": {},
    "clip-svd": {"max_epoch": 2},
    "cooked": {"num_steps": 1},
    "cupl": {"descriptions": "{root}/cupl.json"},
    "dclip": {"descriptions": "{root}/dclip.json"},
    "desc-select": {"descriptions": "{root}/dclip.json", "k": 2},
    "fudd": {"llm": "{llm}"},
    "gopro": {"max_epoch": 2},
    "grip": {"step_quantile": 50, "max_epoch": 1},  # 6 unlabelled rows: 10 rounds would give 0 per class
    "grip-multimodal": {"step_quantile": 50, "max_epoch": 1},
    "grip-visual": {"step_quantile": 50, "max_epoch": 1},
    "linear-probe": {"num_steps": 1},
    "perceptionclip": {"attributes": "{root}/attributes.json"},
    "real": {"corpus": "{root}/captions.txt", "synonyms": "{root}/syn.json"},
    "tip-adapter": {"search_step": [20, 5]},
    "tip-adapter-f": {"epochs": 2, "search_step": [20, 5]},
    "waffle": {"waffle_count": 3},
}
METHODS = [e.name for e in list_heads()]
COMPARED = ("params", "fit", "feature_cache_keys", "train_split", "val_split", "num_images")


def _invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def _values(method: str, root, llm: str) -> dict:
    out = {}
    for key, value in PARAMS.get(method, {}).items():
        out[key] = value.format(root=root, llm=llm) if isinstance(value, str) else value
    return out


def _param_args(method: str, root, llm: str, prefix: str = "") -> list[str]:
    args = []
    for key, value in _values(method, root, llm).items():
        args += ["--param", f"{prefix}{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    return args


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Class folders (flat; train/ and test/), the method inputs, an LLM stub, and one `cliplab fewshot` run of every
    registered method (1 shot, draw seed 1, model seed 1)."""
    root = tmp_path_factory.mktemp("parity")
    rng = np.random.default_rng(0)
    for folder, count in (("flat", 3), ("split/train", 6), ("split/test", 3)):
        for c, cls in enumerate(CLASSES):
            (root / folder / cls).mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(rng.normal(80 + 90 * c, 40, (20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / folder / cls / f"{i}.png")
    (root / "dclip.json").write_text(json.dumps({"apple": ["red skin", "a stem"], "pear": ["a bell shape"]}))
    (root / "cupl.json").write_text(json.dumps({"apple": ["A photo of an apple, a round red fruit."],
                                                "pear": ["A pear is a sweet fruit.", "A green pear on a table."]}))
    (root / "attributes.json").write_text(json.dumps({"background": ["", "on a table"]}))
    (root / "captions.txt").write_text("a red apple\nan apple pie\nsliced pears on a plate\nthe pear tree\n")
    (root / "syn.json").write_text(json.dumps({"apple": ["apple", "red apple"], "pear": ["pear", "pears"]}))
    saved = {k: os.environ.get(k) for k in ("CLIPLAB_CACHE", "CLIPLAB_LLM_MODEL")}
    os.environ.update(CLIPLAB_CACHE=str(root / "home-cache"), CLIPLAB_LLM_MODEL="stub-model")
    try:
        with Stub(lambda body, n: (200, PAIR_ANSWER, 0)) as stub:
            common = ["--model", "tiny", "--seed", "1", "-q", "--workers", "0", "--cache-dir", root / "cache"]
            params = [a for m in METHODS for a in _param_args(m, root, stub.url, prefix=f"{m}.")]
            _invoke("fewshot", "--dataset", root / "split", "--methods", ",".join(METHODS), "--shots", "1",
                    "--seeds", "1", "-o", root / "fewshot", *params, *common)
            yield {"root": root, "llm": stub.url, "common": common}
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _same(a, b) -> bool:
    """Equal as JSON (NaN, e.g. top-5 of two classes, equals NaN)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _record(folder, method: str) -> dict:
    files = [p for p in folder.glob("*.json") if p.name.startswith(f"{method}_") and
             json.loads(p.read_text())["cliplab"]["method"] == method]
    assert len(files) == 1, sorted(p.name for p in folder.iterdir())
    return json.loads(files[0].read_text())


@pytest.mark.parametrize("method", METHODS)
def test_evaluate_and_fewshot_give_the_same_numbers(setup, method, tmp_path):
    root = setup["root"]
    out = tmp_path / "evaluate"
    _invoke("evaluate", "--method", method, "--dataset", root / "split", "--shots", "1", "-o", out,
            *_param_args(method, root, setup["llm"]), *setup["common"])
    mine, theirs = _record(out, method), _record(root / "fewshot" / "runs", method)
    assert _same(mine["metrics"], theirs["metrics"])  # top-1, top-5 (n/a with 2 classes), mean per-class recall
    assert _same(mine["cliplab"]["calibration"], theirs["cliplab"]["calibration"])  # ECE: continuous in the logits
    for key in COMPARED:
        assert _same(mine["cliplab"][key], theirs["cliplab"][key]), key
    if mine["cliplab"]["train_split"] is not None:  # the same draw
        drawn = json.loads(next(out.glob("split_*_1shot_seed1.json")).read_text())
        fewshot_split = json.loads(next((root / "fewshot" / "splits").glob("*_1shot_seed1.json")).read_text())
        assert (drawn["train_ids"], drawn["val_ids"]) == (fewshot_split["train_ids"], fewshot_split["val_ids"])


def _classify_probabilities(args, out) -> dict[str, list]:
    _invoke("classify", *args, "-o", out)
    rows = json.loads(out.read_text())
    return {row["path"]: {p["label"]: p["probability"] for p in row["predictions"]} for row in rows}


@pytest.mark.parametrize("method, extra", [("waffle", []), ("cupl", []), ("cupl", ["--descriptions", "cupl.json"])])
def test_classify_builds_what_zeroshot_builds(setup, tiny, method, extra, tmp_path):
    """The classifier `zeroshot --method M` records (its parameters) scores `classify --method M`'s images as
    classify does; before, classify gave waffle and cupl the imagenet7 templates."""
    root = setup["root"]
    extra = [str(root / a) if a.endswith(".json") else a for a in extra]
    common = ["--model", "tiny", "-q", "--workers", "0", "--cache-dir", tmp_path / "cache"]
    _invoke("zeroshot", "--dataset", root / "flat", "--method", method, *extra, "-o", tmp_path / "z", *common)
    params = _record(tmp_path / "z", method)["cliplab"]["params"]
    got = _classify_probabilities([root / "flat", "--labels", ",".join(CLASSES), "--method", method, *extra,
                                   "--top-k", "2", *common], tmp_path / "c.json")
    head = create_head(method, backbone=tiny, class_names=list(CLASSES), **params).fit()
    from cliplab.data import image_files
    from cliplab.features import embed_images

    feats = embed_images(tiny, image_files([root / "flat"]), tmp_path / "cache", num_workers=0, progress=False)
    expected = head.predict_proba(feats.features)
    assert len(got) == len(feats) == 6
    for item, probs in zip(feats.item_ids, expected):
        assert [got[item][c] for c in CLASSES] == pytest.approx(probs.tolist(), abs=1e-6), item


def _flat(text: str) -> str:
    return "".join(text.split())


def test_help_texts_list_the_registered_methods_and_real_parameters():
    import inspect

    from cliplab.heads import get_head

    fewshot = runner.invoke(app, ["fewshot", "--help"], terminal_width=200).output
    named = re.findall(r"([a-z][a-z0-9-]*)\.([a-z_]+)=", fewshot)
    assert named, fewshot
    for method, parameter in named:
        assert parameter in inspect.signature(get_head(method).__init__).parameters, (method, parameter)
    assert _flat(", ".join(method_names())) in _flat(fewshot)
    zeroshot = _flat(runner.invoke(app, ["zeroshot", "--help"], terminal_width=200).output)
    assert _flat(", ".join(method_names("zeroshot", trained=False))) in zeroshot
    assert _flat(", ".join(method_names(need="llm"))) in zeroshot
    evaluate = _flat(runner.invoke(app, ["evaluate", "--help"], terminal_width=200).output)
    assert _flat(", ".join(method_names())) in evaluate
    explain = _flat(runner.invoke(app, ["explain", "--help"], terminal_width=200).output)
    assert _flat(", ".join(method_names(gives="sentences"))) in explain


def test_caps_adapter_in_classify_labels_each_image_as_it_would_alone(setup, tmp_path):
    """CapS-Adapter rescales its KL term over the images scored together (its evaluation mode); classify applies
    its declared per-image mode, so an image's probabilities do not depend on the rest of the folder."""
    root = setup["root"]
    common = setup["common"]
    _invoke("evaluate", "--method", "caps-adapter", "--dataset", root / "split", "--shots", "2", "--param", "gamma=5",
            "-o", tmp_path / "e", "--save-head", tmp_path / "head", *common)
    labels = ["--head", tmp_path / "head", "--top-k", "2", *common]
    folder = _classify_probabilities([root / "flat", *labels], tmp_path / "all.json")
    for image in (root / "flat" / "apple" / "0.png", root / "flat" / "pear" / "2.png"):
        alone = _classify_probabilities([image, *labels], tmp_path / "one.json")
        (row,) = alone.values()
        (same,) = [probs for path, probs in folder.items() if path.endswith(f"{image.parent.name}/{image.name}")]
        assert [same[c] for c in CLASSES] == pytest.approx([row[c] for c in CLASSES], abs=1e-6)
