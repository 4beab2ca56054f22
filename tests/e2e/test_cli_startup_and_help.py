"""The command line starts fast and its help tells the truth.

Listing commands run without torch (``import cliplab.cli.app`` alone is checked in
``tests/unit/test_layers.py``); help has no reStructuredText/markdown backticks, no text cut with an
ellipsis, and flags without a value type; listing commands fail with one line and exit code 2.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest
import typer
from typer.testing import CliRunner

from cliplab.cli.app import app

runner = CliRunner()
COMMANDS = sorted(typer.main.get_command(app).commands)
HEAVY = ("torch", "open_clip", "torchvision", "transformers")
#: Every library that costs start-up time (scipy alone is over a second of CPU on these machines); none may load
#: for cliplab --help, COMMAND --help or the listing commands.
SLOW = (*HEAVY, "scipy", "sklearn", "faiss", "ray", "pyarrow", "matplotlib")


def _modules_after(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter; the slow-to-import modules (``SLOW``) it left imported."""
    script = textwrap.dedent(code) + textwrap.dedent(f"""
        import sys
        print(" ".join(m for m in {SLOW!r} if m in sys.modules))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600)  # a hang guard only: a loaded machine may take minutes to import
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.mark.parametrize("args", [["--help"], ["methods"], ["templates"], ["templates", "imagenet7"], ["datasets"],
                                  ["cache"]], ids=" ".join)
def test_listing_commands_load_no_heavy_library(args, tmp_path):
    loaded = _modules_after(f"""
        import os
        os.environ["CLIPLAB_CACHE"] = {str(tmp_path / "cache")!r}
        from typer.testing import CliRunner
        from cliplab.cli.app import app
        result = CliRunner().invoke(app, {args!r})
        assert result.exit_code == 0, result.output
    """)
    assert not loaded, f"cliplab {' '.join(args)} imported {loaded}"


def test_every_command_help_loads_no_heavy_library():
    loaded = _modules_after("""
        import typer
        from typer.testing import CliRunner
        from cliplab.cli.app import app
        for name in sorted(typer.main.get_command(app).commands):
            result = CliRunner().invoke(app, [name, "--help"])
            assert result.exit_code == 0, (name, result.output)
    """)
    assert not loaded, f"a COMMAND --help imported {loaded}"


def test_packages_import_without_torch_and_keep_their_names():
    loaded = _modules_after("""
        import cliplab.features, cliplab.heads, cliplab.ood
        from cliplab.features import FeatureCache, cache_root, default_cache_root
        from cliplab.heads import HeadEntry, create_head, describe_heads, get_head, head_entry, list_heads, register
        from cliplab.ood import create_score, describe_scores, list_scores, register_score, score_entry
        assert describe_scores()
    """)
    assert not loaded, loaded


FEATURES_NAMES = [  # what cliplab.features exported when it imported everything eagerly
    "FeatureCache", "FewShotSplit", "ImageFeatures", "cache_root", "class_weights", "default_cache_root",
    "embed_images", "embed_prompts", "embed_texts", "ensemble", "image_cache", "load_split", "model_record",
    "text_cache",
]
HEADS_NAMES = [
    "ClipHead", "HeadEntry", "NearestClassMean", "ZeroShotClassifier", "create_head", "get_head", "head_entry",
    "list_heads", "load_all", "register",
]


def test_lazy_packages_export_every_name_they_did():
    import importlib

    import cliplab.features
    import cliplab.heads

    for package, names, modules in ((cliplab.features, FEATURES_NAMES, ("cache", "embed", "text", "values")),
                                    (cliplab.heads, HEADS_NAMES, ("base", "ncm", "registry", "zeroshot"))):
        assert set(names) <= set(package.__all__) and set(names) <= set(dir(package))
        defined = {}
        for module in modules:
            defined.update(vars(importlib.import_module(f"{package.__name__}.{module}")))
        for name in names:
            value = getattr(package, name)
            assert value is defined[name], name
            namespace: dict = {}
            exec(f"from {package.__name__} import {name}", namespace)
            assert namespace[name] is value
        with pytest.raises(AttributeError):
            package.no_such_name  # noqa: B018


def test_scores_read_from_source_equal_the_registry():
    from cliplab.ood.registry import _scan_sources, list_scores

    scanned = _scan_sources()
    assert scanned is not None, "a score's @register_score(...) could not be read statically"
    assert sorted(scanned, key=lambda s: s.name) == [e.summary_row() for e in list_scores()]


def test_heads_read_from_source_equal_the_registry():
    from cliplab.heads import list_heads
    from cliplab.heads.registry import _scan_sources

    scanned = _scan_sources()
    assert scanned is not None, "a head's @register(...) could not be read statically"
    registered = [e.summarised() for e in list_heads()]
    assert sorted(scanned, key=lambda s: s.name) == registered


# -- help -----------------------------------------------------------------------------------------------------
def _help(args: list[str], width: int | None = None) -> str:
    """``--help`` as CliRunner renders it: 80 columns (what a pipe gets), or ``width`` (a narrow terminal)."""
    extra = {"terminal_width": width} if width else {}
    result = runner.invoke(app, [*args, "--help"], **extra)
    assert result.exit_code == 0, result.output
    if width:
        assert max(map(len, result.output.splitlines())) <= width + 2, result.output
    return result.output


@pytest.mark.parametrize("width", [None, 50], ids=["default-width", "narrow"])  # click's floor for a terminal
@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_is_plain_and_whole(command, width):
    text = _help([command] if command else [], width)
    assert "`" not in text, "reStructuredText/markdown literal in help"
    assert "…" not in text, "help cut with an ellipsis"
    assert "<bool>" not in text, "a flag shown as taking a value"
    click_command = typer.main.get_command(app)
    if command:
        click_command = click_command.commands[command]
    flat = _flat(text)
    for param in click_command.params:
        for flag in [*getattr(param, "opts", []), *getattr(param, "secondary_opts", [])]:
            assert flag in text, f"{flag} missing from the help"
        if getattr(param, "help", None):  # every word of every help text is there, wrapped but not cut
            assert _flat(param.help) in flat, param.help


def _flat(text: str) -> str:
    """The text without whitespace: what survives wrapping (also of a word broken at a hyphen or mid-word)."""
    return "".join(text.split())


def test_command_list_shows_each_summary_whole():
    flat = _flat(_help([]))
    for name, command in typer.main.get_command(app).commands.items():
        summary = _flat((command.help or "").splitlines()[0])
        assert summary and f"{name}{summary}" in flat, name


def test_flags_are_shown_as_flags():
    text = _help(["classify"])
    assert re.search(r"^\s+-q, --quiet\s+No progress bars\.", text, re.M), text
    assert re.search(r"^\s+--quick-gelu / --no-quick-gelu\s+\S", text, re.M), text


# -- listing commands: output and one-line errors -------------------------------------------------------------
def _one_line_error(result, *parts: str) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


def test_unknown_template_set_is_one_line_naming_the_known_ones():
    _one_line_error(runner.invoke(app, ["templates", "nosuch"]), "'nosuch'", "imagenet7", "cifar10")


def test_template_set_listing_and_one_set():
    listing = runner.invoke(app, ["templates"])
    assert listing.exit_code == 0 and "imagenet7 (7 templates)" in listing.output
    one = runner.invoke(app, ["templates", "imagenet7"])
    assert one.exit_code == 0 and len(one.output.strip().splitlines()) == 7 and "{c}" in one.output


def test_unknown_architecture_is_one_line():
    _one_line_error(runner.invoke(app, ["models", "NoSuchArch"]), "no architecture matches 'NoSuchArch'")


def test_models_filter_exact_name_then_substring():
    exact = runner.invoke(app, ["models", "vit-b-32"])
    assert exact.exit_code == 0, exact.output
    rows = [line.split("│")[1].strip() for line in exact.output.splitlines() if line.count("│") >= 3]
    assert [r for r in rows if r][:1] == ["ViT-B-32"] and "ViT-B-32-256" not in exact.output
    assert "tiny" not in exact.output.split("local path")[-1]
    tiny = runner.invoke(app, ["models", "TINY"])
    assert tiny.exit_code == 0 and "random weights" in tiny.output


def test_methods_lists_the_registered_heads_and_refuses_an_unknown_family():
    from cliplab.heads import list_heads

    listing = runner.invoke(app, ["methods"])
    assert listing.exit_code == 0
    for entry in list_heads():
        assert entry.name in listing.output
    fewshot = runner.invoke(app, ["methods", "--family", "fewshot"])
    assert "ncm" in fewshot.output and "zeroshot │" not in fewshot.output
    _one_line_error(runner.invoke(app, ["methods", "--family", "nosuch"]), "'nosuch'", "fewshot", "zeroshot")


def test_datasets_lists_those_under_the_data_root_and_names_the_missing(tmp_path):
    from cliplab.data import dataset_names

    (tmp_path / "cifar10").mkdir()
    (tmp_path / "imagenette_sample").mkdir()
    result = runner.invoke(app, ["datasets", "--data-root", str(tmp_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    table, _, missing_line = result.output.rpartition("not found under ")
    assert re.search(r"│ cifar10 +│ cifar10/ +│ train", table)
    assert re.search(r"│ imagenette +│ imagenette_sample/ +│ train", table)
    assert {"train", "val", "test"} <= set(re.findall(r"│ (train|val|test) ", table))
    missing = sorted(set(dataset_names()) - {"cifar10", "imagenette"})
    assert missing_line.strip() == f"{tmp_path}: {', '.join(missing)}"
    for name in missing:
        assert f"│ {name} " not in table


def test_datasets_with_nothing_found_and_with_a_missing_root(tmp_path):
    empty = runner.invoke(app, ["datasets", "--data-root", str(tmp_path)])
    assert empty.exit_code == 0 and "┃ name" not in empty.output and "not found under" in empty.output
    _one_line_error(runner.invoke(app, ["datasets", "--data-root", str(tmp_path / "nope")]), "no such folder")
