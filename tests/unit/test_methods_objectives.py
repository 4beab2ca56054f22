"""``cliplab methods`` lists every training objective (read from source) and every analysis, with its paper."""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
import textwrap

from typer.testing import CliRunner

from cliplab.cli.app import app
from cliplab.cli.listing import describe_objectives


def test_every_registered_objective_is_described_with_its_parameters():
    from cliplab.train import engine

    described = describe_objectives()
    for entry in described:
        importlib.import_module(f"cliplab.{entry.module}")  # registers what the source says it registers
    engine.list_objectives()  # the built-in ones too
    assert [entry.name for entry in described] == sorted(engine._OBJECTIVES)
    for entry in described:
        signature = inspect.signature(engine._OBJECTIVES[entry.name].__init__)
        defaults = {name: p.default for name, p in signature.parameters.items() if p.default is not p.empty}
        assert {name: ast.literal_eval(written) for name, written in entry.params} == defaults, entry.name


def test_the_objectives_of_issue_29_carry_their_papers():
    papers = {entry.name: entry.paper for entry in describe_objectives()}
    assert {name: papers[name] for name in ("mlcd", "clip-refine", "lightclip", "clip-moe", "distill", "clipn")} == \
        {"mlcd": 27, "clip-refine": 33, "lightclip": 41, "clip-moe": 46, "distill": 8, "clipn": 18}
    assert papers["coop"] == 50  # no paper in its source: the head registered under the same name gives it
    assert papers["clip"] is None and papers["siglip"] is None  # not papers of the list


def test_paper_parameters_and_summary_rules_on_a_written_package(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "one.py").write_text(textwrap.dedent('''
        """Module about paper 7."""
        from x import register_objective, engine

        @register_objective("a")
        class A:
            """First sentence of a (paper 3). Second sentence."""
            def __init__(self, w=1.5, *, k: int = 2, name="n", required=None):
                pass

        @engine.register_objective("b")
        class B:
            """No number here."""

        @other("c")
        class C:
            pass
    '''))
    (tmp_path / "two.py").write_text('"""No decorator call: register_objective( in text only."""\n')
    found = describe_objectives(tmp_path)
    assert [(e.name, e.paper, e.module) for e in found] == [("a", 3, "sub.one"), ("b", 7, "sub.one")]
    assert found[0].params == (("w", "1.5"), ("k", "2"), ("name", "'n'"), ("required", "None"))
    assert found[0].summary == "First sentence of a (paper 3)." and found[1].params == ()


def test_methods_lists_objectives_and_analyses_and_their_family_alone():
    from cliplab.analysis.registry import list_analyses

    runner = CliRunner()
    everything = runner.invoke(app, ["methods"])
    assert everything.exit_code == 0, everything.output
    for name in [e.name for e in describe_objectives()] + [e.name for e in list_analyses()] + ["zeroshot"]:
        assert name in everything.output
    alone = runner.invoke(app, ["methods", "--family", "objective"])
    assert alone.exit_code == 0 and "lightclip" in alone.output
    assert "zeroshot" not in alone.output and "cab" not in alone.output.split()


def test_describing_the_objectives_imports_no_heavy_library():
    code = ("import sys\nfrom cliplab.cli.listing import describe_objectives\nassert describe_objectives()\n"
            "print(' '.join(m for m in ('torch', 'open_clip', 'scipy', 'sklearn') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == []
