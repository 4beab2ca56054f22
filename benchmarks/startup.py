"""Command-line start-up: wall time of ``cliplab --help``, every ``COMMAND --help`` and the listing commands.

Each command runs as a fresh process (the ``cliplab`` console script of this venv), side by side with
``python -c pass`` (the interpreter's own start-up), several times in turn; the table gives the median.
With ``--baseline REV`` the same commands also run on the source of a git revision (``git archive`` of its
``src/`` into a temporary folder, put first on ``PYTHONPATH``), interleaved with the working tree's, so
"before" and "after" come from one run on the same machine state. Every process gets an empty
``CLIPLAB_CACHE``. Each command runs once more with ``PYTHONPROFILEIMPORTTIME=1`` to record whether it
imported torch, open_clip, scikit-learn, scipy, transformers, faiss, ray, pyarrow or matplotlib.

    python benchmarks/startup.py [--quick] [--repeats N] [--baseline REV]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from _common import BENCH_DIR, header, load_average, log, md_table, write_results

NAME = "startup"
TARGET_S = 1.0
REPO = BENCH_DIR.parent
COMMANDS = ("classify", "zeroshot", "evaluate", "embed", "models", "methods", "templates", "datasets", "cache")
HEAVY = ("torch", "open_clip", "sklearn", "scipy", "transformers", "faiss", "ray", "pyarrow", "matplotlib")


def cases() -> list[tuple[str, list[str], bool]]:
    """(label, cliplab arguments or None for ``python -c pass``, counts against the 1 s target)."""
    rows: list[tuple[str, list[str] | None, bool]] = [("python -c pass", None, False),
                                                      ("import cliplab.cli.app", ["<import>"], True),
                                                      ("cliplab --help", ["--help"], True)]
    rows += [(f"cliplab {name} --help", [name, "--help"], True) for name in COMMANDS]
    rows += [(f"cliplab {name}", [name], True) for name in ("templates", "datasets", "methods", "cache")]
    rows += [("cliplab models", ["models"], False)]  # lists open_clip's registry: imports open_clip (and torch)
    return rows


def argv(args: list[str] | None) -> list[str]:
    if args is None:
        return [sys.executable, "-c", "pass"]
    if args == ["<import>"]:
        return [sys.executable, "-c", "import cliplab.cli.app"]
    # what the console script does, run by this interpreter so PYTHONPATH decides which cliplab is imported
    return [sys.executable, "-c", "import sys; from cliplab.cli.app import main; sys.argv[0] = 'cliplab'; "
            "sys.exit(main())", *args]


def environment(src: Path | None, cache_dir: Path) -> dict:
    env = dict(os.environ, CLIPLAB_CACHE=str(cache_dir))
    env.pop("PYTHONPROFILEIMPORTTIME", None)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def run_once(args, env) -> tuple[float, int]:
    start = time.perf_counter()
    done = subprocess.run(argv(args), env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start, done.returncode


def heavy_imports(args, env) -> list[str]:
    """Which of ``HEAVY`` the command imports (from ``-X importtime``'s report)."""
    done = subprocess.run(argv(args), env=dict(env, PYTHONPROFILEIMPORTTIME="1"), cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    names = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    return [name for name in HEAVY if name in names]


def which_cliplab(env) -> str:
    code = "import cliplab; print(cliplab.__file__)"
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()


def export_source(rev: str, into: Path) -> tuple[Path, str]:
    """``src/`` of git revision ``rev`` extracted under ``into``; returns (src folder, full commit id)."""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", rev], capture_output=True, text=True,
                            check=True).stdout.strip()
    into.mkdir(parents=True, exist_ok=True)
    archive = into / "src.tar"
    with open(archive, "wb") as handle:
        subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", commit, "src"], stdout=handle, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / "src", commit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of 7")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--baseline", default=None, metavar="REV",
                        help="also measure the src/ of this git revision (e.g. HEAD), interleaved")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 7)

    record = header(NAME, "wall time of cliplab start-up commands vs python -c pass (fresh process each)",
                    args.quick)
    record["load_average_start"] = load_average()
    with tempfile.TemporaryDirectory(prefix="cliplab-startup-") as scratch:
        scratch = Path(scratch)
        cache_dir = scratch / "empty-cache"
        cache_dir.mkdir()
        variants = {"current": environment(REPO / "src", cache_dir)}
        sources = {"current": "working tree src/"}
        if args.baseline:
            base_src, commit = export_source(args.baseline, scratch / "baseline")
            variants["baseline"] = environment(base_src, cache_dir)
            sources["baseline"] = f"git {args.baseline} = {commit[:12]} (src/ via git archive)"
        record["variants"] = {name: {"source": sources[name], "cliplab_imported_from": which_cliplab(env)}
                              for name, env in variants.items()}
        rows = cases()
        times: dict[tuple[str, str], list[float]] = {}
        codes: dict[tuple[str, str], set[int]] = {}
        log(f"warm-up: {len(rows)} commands x {len(variants)} variant(s)")
        for _label, cli_args, _ in rows:
            for env in variants.values():
                run_once(cli_args, env)
        for r in range(repeats):
            log(f"repeat {r + 1}/{repeats}")
            for label, cli_args, _ in rows:
                for name, env in variants.items():
                    seconds, code = run_once(cli_args, env)
                    times.setdefault((label, name), []).append(seconds)
                    codes.setdefault((label, name), set()).add(code)
        imports = {(label, name): heavy_imports(cli_args, env)
                   for label, cli_args, _ in rows for name, env in variants.items()}

    results = []
    for label, _, targeted in rows:
        for name in variants:
            values = times[(label, name)]
            results.append({
                "command": label, "variant": name, "median_s": statistics.median(values), "min_s": min(values),
                "max_s": max(values), "runs_s": values, "exit_codes": sorted(codes[(label, name)]),
                "heavy_imports": imports[(label, name)], "target_s": TARGET_S if targeted else None,
                "meets_target": (statistics.median(values) < TARGET_S) if targeted else None,
            })
    record.update(rows=results, repeats=repeats, target_s=TARGET_S, load_average_end=load_average())

    by = {(r["command"], r["variant"]): r for r in results}
    python_s = by[("python -c pass", "current")]["median_s"]
    columns = ["command"]
    if "baseline" in variants:
        columns += ["before: median s", "before: imports"]
    columns += ["median s", "min s", "minus python s", "imports", "exit", f"< {TARGET_S:.0f} s"]
    table = []
    for label, _, targeted in rows:
        now = by[(label, "current")]
        line = [f"`{label}`"]
        if "baseline" in variants:
            before = by[(label, "baseline")]
            line += [f"{before['median_s']:.2f}", ", ".join(before["heavy_imports"]) or "-"]
        line += [f"{now['median_s']:.2f}", f"{now['min_s']:.2f}", f"{now['median_s'] - python_s:.2f}",
                 ", ".join(now["heavy_imports"]) or "-", ",".join(map(str, now["exit_codes"])),
                 ("yes" if now["meets_target"] else "NO") if targeted else "(info)"]
        table.append(line)
    before_note = (f"'before' = {sources['baseline']}, run interleaved with the working tree in the same "
                   "process loop. " if "baseline" in variants else "")
    body = "\n".join([
        "# Command-line start-up time",
        "",
        f"Wall time of a fresh process per command, median of {repeats} runs after one warm-up run "
        f"(the commands take turns, so machine noise spreads over all of them). Empty `CLIPLAB_CACHE`; working "
        f"directory the repository root. {before_note}'imports' = which of {', '.join(HEAVY)} the command "
        "loads (from `-X importtime`). Target: under 1 s on this machine for every command marked; "
        "`cliplab models` lists open_clip's own registry and so imports open_clip (information only).",
        "",
        md_table(columns, table),
        "",
        f"`python -c pass` (interpreter start-up alone): {python_s:.3f} s median.",
    ])
    write_results(NAME, record, body)


if __name__ == "__main__":
    main()
