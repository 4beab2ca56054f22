import json

import pytest

from cliplab.data import builtin_class_names, load_templates, parse_labels, read_class_names, template_sets
from cliplab.errors import LabelError, TemplateError


def test_builtin_template_sets_have_published_sizes():
    assert len(load_templates("imagenet80")) == 80
    assert len(load_templates("imagenet7")) == 7
    assert len(load_templates("cifar10")) == 18  # CLIP_benchmark's CIFAR set
    assert load_templates("mnist") == ['a photo of the number: "{c}".']
    assert {"cifar10", "cifar100", "mnist", "stl10", "imagenet", "generic"} <= set(template_sets())
    assert "itap of a {c}." in load_templates("imagenet7")


def test_builtin_class_names():
    assert builtin_class_names("cifar10")[:3] == ["airplane", "automobile", "bird"]
    assert len(builtin_class_names("cifar100")) == 100 and len(builtin_class_names("imagenet")) == 1000
    assert builtin_class_names("nope") is None


def test_user_template_files(tmp_path):
    (tmp_path / "t.txt").write_text("a photo of a {c}.\n\n# comment\nart of the {}.\n")
    (tmp_path / "t.json").write_text(json.dumps({"templates": ["{c} in the wild"]}))
    assert load_templates(tmp_path / "t.txt") == ["a photo of a {c}.", "art of the {c}."]
    assert load_templates(str(tmp_path / "t.json")) == ["{c} in the wild"]
    assert load_templates(["x {c}"]) == ["x {c}"]


@pytest.mark.parametrize("bad", [[], ["no placeholder"], ["{c} and {c}"]])
def test_bad_templates(bad):
    with pytest.raises(TemplateError):
        load_templates(bad)


def test_unknown_template_set_names_the_choices():
    with pytest.raises(TemplateError, match="imagenet80"):
        load_templates("no-such-set")


def test_labels_parsing_and_errors(tmp_path):
    assert parse_labels(" cat, dog ,car") == ["cat", "dog", "car"]
    with pytest.raises(LabelError, match="no class names"):
        parse_labels(" , ")
    with pytest.raises(LabelError, match="duplicate class name 'Cat'"):
        parse_labels("cat,dog,Cat")
    with pytest.raises(LabelError, match="empty class name at position 2"):
        parse_labels("cat,,dog")


def test_class_name_files(tmp_path):
    (tmp_path / "a.txt").write_text("cat\n\ndog\n")
    (tmp_path / "b.json").write_text(json.dumps({"1": "dog", "0": "cat"}))
    (tmp_path / "c.json").write_text(json.dumps({"classnames": ["x", "y"]}))
    (tmp_path / "empty.txt").write_text("\n\n")
    assert read_class_names(tmp_path / "a.txt") == ["cat", "dog"]
    assert read_class_names(tmp_path / "b.json") == ["cat", "dog"]
    assert read_class_names(tmp_path / "c.json") == ["x", "y"]
    with pytest.raises(LabelError, match="empty.txt"):
        read_class_names(tmp_path / "empty.txt")
    with pytest.raises(LabelError, match="not found"):
        read_class_names(tmp_path / "missing.txt")


def test_class_prompts_from_templates_or_a_mapping():
    from cliplab.data import class_prompts

    assert class_prompts(["cat", "dog"], ["a {c}", "the {c}"]) == [["a cat", "the cat"], ["a dog", "the dog"]]
    mapping = {"aquarium fish": ["a small fish in a tank"], "Maple Tree": ["a maple"]}
    assert class_prompts(["aquarium_fish", "maple_tree"], mapping) == [["a small fish in a tank"], ["a maple"]]


def test_real_cupl_cifar100_prompts_cover_clip_benchmark_names():
    from pathlib import Path

    from cliplab.data import class_prompts

    path = Path(__file__).resolve().parents[3] / "shared" / "descriptions" / "cupl" / "base_prompts"
    if not (path / "cifar100_prompts_base.json").is_file():
        pytest.skip("CuPL files not found")
    mapping = json.loads((path / "cifar100_prompts_base.json").read_text())
    prompts = class_prompts(builtin_class_names("cifar100"), mapping)
    assert len(prompts) == 100 and all(prompts)
