"""Issue 22 item 4: a missing folder, a misspelled dataset name or split and an unreadable labels file are
answered before torch or open_clip is imported (checked in a fresh interpreter, after each command)."""

from __future__ import annotations

import json
import subprocess
import sys

from PIL import Image

SCRIPT = r"""
import json, sys
from typer.testing import CliRunner
from cliplab.cli.app import app
out = []
for args in json.loads(sys.argv[1]):
    result = CliRunner().invoke(app, args)
    heavy = "torch" in sys.modules or "open_clip" in sys.modules
    out.append([result.exit_code, " ".join(result.output.split()), heavy])
print(json.dumps(out))
"""


def test_typos_are_reported_without_importing_torch(tmp_path):
    split_folder = tmp_path / "pets"
    for split in ("train", "test"):
        (split_folder / split / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(split_folder / split / "cat" / "0.png")
    bad_labels = tmp_path / "labels.txt"
    bad_labels.write_bytes(b"\xff\xfecat\x80")
    cases = [
        (["zeroshot", "--dataset", str(tmp_path / "missing")], "unknown dataset"),
        (["evaluate", "--method", "ncm", "--dataset", "cifra10"], "unknown dataset 'cifra10'"),
        (["evaluate", "--method", "cooop", "--dataset", "cifra10"], "unknown method 'cooop'"),
        (["fewshot", "--dataset", str(split_folder), "--split", "tset"], "no split 'tset'"),
        (["zeroshot", "--dataset", str(split_folder), "--split", "tset"], "no split 'tset'"),
        (["classify", str(split_folder), "--labels-file", str(bad_labels)], "unreadable"),
        (["classify", str(split_folder), "--labels-file", str(tmp_path / "none.txt")], "not found"),
        (["classify", str(tmp_path / "missing"), "--labels", "cat,dog"], "no such file or folder"),
    ]
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps([args for args, _ in cases])],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for (args, expected), (code, text, heavy) in zip(cases, results):
        assert code == 2 and expected in text, (args, text)
        assert not heavy, f"{args[0]}: torch/open_clip imported before the error: {text}"
