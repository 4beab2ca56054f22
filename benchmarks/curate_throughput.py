"""MetaCLIP curation (``cliplab curate``, paper 17) on 1,000,000 synthetic captions: captions/s and peak RSS.

The pool is generated here, seeded, into a temporary JSONL (``image``, ``caption``). Metadata: 50,000
entries = the first 3,000 whole-word tokens of CLIP's BPE merge list (open_clip's
``bpe_simple_vocab_16e6.txt.gz``, in merge order: frequent caption words, some of them word pieces) +
37,000 synthetic pronounceable words + 10,000 two-word entries (a common word and a synthetic one).
Captions: 4-20 words drawn from a Zipf-Mandelbrot law over the 3,000 common words followed by 60,000
synthetic words (the last 23,000 are not entries), one of the two-word entries in 30% of captions,
capitalised, with commas and full stops. Curation runs in a child process, once on 100,000 and once on
1,000,000 captions, so the two peaks show whether memory grows with the pool; a child that only imports the
same modules gives the baseline. Peak RSS is the child's VmHWM (``/proc/self/status``); ``resource.getrusage``'s
``ru_maxrss`` is recorded too, but Linux carries it over from the parent across fork and exec, so it is at
least the parent's RSS (about 0.7 GiB here, torch imported) and says nothing about curation. t = 20,000
(MetaCLIP's).

    python benchmarks/curate_throughput.py [--quick] [--captions N]
"""

from __future__ import annotations

import argparse
import gzip
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import CpuAccount, header, load_average, log, md_table, vm_hwm_bytes, write_results

ENTRIES, COMMON, SYNTHETIC_ENTRIES, BIGRAMS, SYNTHETIC_WORDS = 50_000, 3_000, 37_000, 10_000, 60_000
T = 20_000
SEED = 0
CHUNK = 100_000


def common_words(count: int = COMMON) -> list[str]:
    """The first ``count`` whole-word tokens (lower-case ASCII letters) of CLIP's BPE merges, in merge order."""
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    words: dict[str, None] = {}
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        next(handle)
        for line in handle:
            parts = line.split()
            if len(parts) != 2:
                continue
            token = parts[0] + parts[1]
            word = token[:-4]
            if token.endswith("</w>") and word.isascii() and word.isalpha() and word.islower():
                words.setdefault(word)
                if len(words) == count:
                    break
    return list(words)


def synthetic_words(count: int, exclude: set[str], rng: np.random.Generator) -> list[str]:
    """Distinct pronounceable words of 2-4 consonant-vowel syllables, none of them in ``exclude``."""
    consonants, vowels = list("bcdfghjklmnprstvwz"), list("aeiou")
    out: dict[str, None] = {}
    while len(out) < count:
        syllables = rng.integers(2, 5, size=count)
        c = rng.choice(consonants, size=(count, 4))
        v = rng.choice(vowels, size=(count, 4))
        for k in range(count):
            word = "".join(c[k, j] + v[k, j] for j in range(syllables[k]))
            if word not in exclude:
                out.setdefault(word)
            if len(out) == count:
                break
    return list(out)


def build(directory: Path, captions: int) -> tuple[Path, Path, dict]:
    """Write ``metadata.txt`` and ``pool.jsonl`` (``captions`` captions) into ``directory``."""
    rng = np.random.default_rng(SEED)
    common = common_words()
    synthetic = synthetic_words(SYNTHETIC_WORDS, set(common), rng)
    vocab = common + synthetic
    ranks = np.arange(len(vocab), dtype=np.float64)
    weights = 1.0 / (ranks + 2.7) ** 1.05
    weights /= weights.sum()
    first = rng.choice(COMMON, size=BIGRAMS)
    second = COMMON + rng.integers(0, SYNTHETIC_ENTRIES, size=BIGRAMS)
    bigrams = list(dict.fromkeys(f"{vocab[a]} {vocab[b]}" for a, b in zip(first, second)))
    entries = common + synthetic[:SYNTHETIC_ENTRIES] + bigrams
    entries = entries[:ENTRIES]
    metadata = directory / "metadata.txt"
    metadata.write_text("\n".join(entries) + "\n")
    bigram_weights = 1.0 / (np.arange(len(bigrams)) + 10.0)
    bigram_weights /= bigram_weights.sum()
    pool = directory / "pool.jsonl"
    with open(pool, "w", encoding="utf-8") as out:
        for start in range(0, captions, CHUNK):
            n = min(CHUNK, captions - start)
            lengths = rng.integers(4, 21, size=n)
            words = rng.choice(len(vocab), size=int(lengths.sum()), p=weights)
            with_bigram = rng.random(n) < 0.3
            chosen = rng.choice(len(bigrams), size=n, p=bigram_weights)
            where = rng.random(n)
            stop = rng.random(n) < 0.5
            comma = rng.random(n)
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            lines = []
            for k in range(n):
                tokens = [vocab[w] for w in words[offsets[k]:offsets[k + 1]]]
                if with_bigram[k]:
                    tokens.insert(int(where[k] * len(tokens)), bigrams[chosen[k]])
                if comma[k] < 0.3:
                    position = 1 + int(comma[k] / 0.3 * (len(tokens) - 1))
                    tokens[position - 1] += ","
                caption = " ".join(tokens)
                caption = caption[0].upper() + caption[1:] + ("." if stop[k] else "")
                lines.append(json.dumps({"image": f"images/{start + k:08d}.jpg", "caption": caption}))
            out.write("\n".join(lines) + "\n")
    setup = {"captions": captions, "metadata_entries": len(entries), "common_words": len(common),
             "synthetic_entry_words": SYNTHETIC_ENTRIES, "synthetic_words_in_captions": SYNTHETIC_WORDS,
             "two_word_entries": len(entries) - len(common) - SYNTHETIC_ENTRIES,
             "pool_bytes": pool.stat().st_size, "seed": SEED, "t": T,
             "example_captions": [json.loads(line)["caption"] for line in pool.read_text().splitlines()[:3]]}
    return pool, metadata, setup


def child(pool: str, metadata: str, output: str) -> None:
    """Run in a fresh process: curate, then print the summary and this process's peak RSS as JSON."""
    from cliplab.data.curate import curate

    start = time.perf_counter()
    result = curate(pool, metadata, output, t=T, seed=SEED, progress=sys.stderr.isatty())
    wall = time.perf_counter() - start
    print(json.dumps({"summary": result.summary, "wall_s": wall, **peaks()}))


def peaks() -> dict:
    """This process's peak RSS: VmHWM (of its own memory since exec), and ``getrusage``'s ``ru_maxrss``, which
    Linux carries over from the parent at fork/exec (so it is at least the parent's RSS then)."""
    rusage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_rss_bytes": vm_hwm_bytes(), "ru_maxrss_bytes": rusage}


def baseline() -> None:
    """Peak RSS of a process that imports what curation imports and does nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import tqdm  # noqa: F401

    import cliplab.data.curate  # noqa: F401

    print(json.dumps(peaks()))


def run_child(*arguments: str) -> dict:
    done = subprocess.run([sys.executable, __file__, *arguments], capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"child failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(*sys.argv[2:5])
    if len(sys.argv) > 1 and sys.argv[1] == "--baseline":
        return baseline()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100,000 captions only")
    parser.add_argument("--captions", type=int, default=1_000_000)
    args = parser.parse_args()
    sizes = [100_000] if args.quick else sorted({100_000, args.captions})
    record = header("curate_throughput", __doc__.strip().splitlines()[0], args.quick)
    work = Path(tempfile.mkdtemp(prefix="cliplab-curate-bench-"))
    rows, runs = [], []
    try:
        base = run_child("--baseline")["peak_rss_bytes"]
        for size in sizes:
            log(f"generating {size:,} captions")
            started = time.perf_counter()
            pool, metadata, setup = build(work, size)
            generated = time.perf_counter() - started
            log(f"generated in {generated:.1f} s ({setup['pool_bytes'] / 2**20:.0f} MiB); curating")
            with CpuAccount() as cpu:
                out = run_child("--child", str(pool), str(metadata), str(work / f"out{size}"))
            s = out["summary"]
            manifest_bytes = (work / f"out{size}" / "curated.jsonl").stat().st_size
            log(f"{size:,}: {s['captions_per_s']:,.0f} captions/s, peak RSS {out['peak_rss_bytes'] / 2**20:.0f} MiB, "
                f"other processes used {cpu.result['foreign_load']:.2f} cores meanwhile")
            runs.append({"setup": setup, "generate_s": generated, "wall_s": out["wall_s"],
                         "peak_rss_bytes": out["peak_rss_bytes"], "ru_maxrss_bytes": out["ru_maxrss_bytes"],
                         "manifest_bytes": manifest_bytes, "cpu": cpu.result, "load_average": load_average(),
                         "summary": s})
            rows.append([f"{size:,}", f"{s['captions_per_s']:,.0f}", round(s["seconds"]["pass1_match_count"], 1),
                         round(s["seconds"]["pass2_sample"], 1), round(out["wall_s"], 1),
                         round(cpu.result["foreign_load"], 2),
                         f"{out['peak_rss_bytes'] / 2**20:.0f}", f"{(out['peak_rss_bytes'] - base) / 2**20:.0f}",
                         f"{s['pairs_matched']:,}", round(s["matches_before"] / max(s["pairs_matched"], 1), 1),
                         f"{s['pairs_out']:,}", s["head_entries_before"],
                         f"{s['max_count_before']:,} -> {s['max_count_after']:,}"])
            (work / "pool.jsonl").unlink()
            shutil.rmtree(work / f"out{size}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    record["setup"] = {k: v for k, v in runs[-1]["setup"].items() if k != "captions"}
    record["baseline_peak_rss_bytes"] = base
    record["runs"] = runs
    last = runs[-1]
    body = "\n".join([
        "# MetaCLIP curation throughput (`cliplab curate`)", "",
        f"Synthetic pool (seeded), {ENTRIES:,} metadata entries: the first {COMMON:,} whole-word tokens of CLIP's "
        f"BPE merges, {SYNTHETIC_ENTRIES:,} synthetic words and {last['setup']['two_word_entries']:,} two-word "
        "entries; captions of 4-20 Zipf-distributed words (60,000 synthetic words after the common ones, the "
        "last 23,000 not entries), a two-word entry in 30% of them, commas and full stops. "
        f"t = {T:,}, seed {SEED}. Curation runs in a child process; peak RSS is its VmHWM (`ru_maxrss` of "
        "`resource.getrusage` is in the JSON, but Linux carries it over from the parent across exec), and "
        f"'over baseline' subtracts a child that only imports the same modules ({base / 2**20:.0f} MiB). "
        "Both passes are timed (pass 1 streams, matches and counts; pass 2 samples the spilled matches "
        "and writes the manifest); the plot and reports are written after. 'Other load' is the CPU time other "
        "processes took per wall second meanwhile (2 cores shared with other work: it slows the run).", "",
        md_table(["captions", "captions/s", "pass 1 s", "pass 2 s", "wall s", "other load (cores)", "peak RSS MiB",
                  "over baseline MiB", "matched", "entries per pair", "kept", "entries > t",
                  "largest entry count"], rows), "",
        "Almost every pair is kept: each synthetic caption matches about a dozen entries, and nearly all of them "
        "hold at least one entry matched t times or fewer, which keeps the pair whatever its head entries "
        "(MetaCLIP's co-occurrence effect). The pool is built to time the code, not to show the balancing; "
        "tests/unit/test_curate.py checks the sampling.", "",
        f"Example captions: {'; '.join(repr(c) for c in last['setup']['example_captions'])}", ""])
    write_results("curate_throughput", record, body)


if __name__ == "__main__":
    main()
