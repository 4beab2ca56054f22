"""MetaCLIP curation (paper 17): substring matching as their code, counts, t/count sampling, reports, the CLI."""

import csv
import json
import math
import random
import tracemalloc

import numpy as np
import pytest
from typer.testing import CliRunner

from cliplab.cli.app import app
from cliplab.data import manifest
from cliplab.data.curate import (
    DEFAULT_T,
    SubstringMatcher,
    curate,
    entry_probabilities,
    keep_probability,
    load_metadata,
    never_matches,
)
from cliplab.errors import CliplabError, DatasetError


def metaclip_spacing(text):
    """MetaCLIP's ``spacing`` (metaclip/metaclip1/substr_matching.py), written out from its definition."""
    text = f" {text} "
    for mark in [",", ".", ";", ":", "?", "!", "`"]:
        text = text.replace(mark, f" {mark} ")
    for char in ["\t", "\n", "\r"]:
        text = text.replace(char, " ")
    return text


def metaclip_match(text, entries):
    """Their plain ``substr_matching``: entry ids whose ``" e "`` is a substring of the spaced text."""
    spaced = metaclip_spacing(text)
    return [i for i, entry in enumerate(entries) if f" {entry} " in spaced]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_metadata(path, entries):
    path.write_text("\n".join(entries) + "\n")
    return path


def read_manifest(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- matching -------------------------------------------------------------------------------------------------
ENTRIES = ["dog", "cat", "a", "hot dog", "new york", "york city", "St. Louis", "Dog", "dog , a", "dog ,  a", "."]


@pytest.mark.parametrize("text, expected", [
    ("A dog, a cat.", {"dog", "cat", "a", "dog ,  a", "."}),   # ',' gets spaces around it, so "dog ,  a" (two)
    ("Dog on a hotdog stand", {"Dog", "a"}),                  # case-sensitive; no match inside a word
    ("dogs and cats", set()),                                 # whole words only
    ("a hot dog in new york city", {"a", "hot dog", "dog", "new york", "york city"}),  # overlapping entries
    ("hot\tdog\nnew\r\nyork", {"hot dog", "dog"}),            # tab/newline -> space; "\r\n" -> two spaces
    ("hot  dog", {"dog"}),                                    # a double space breaks a multi-word entry
    ("We met in St. Louis", {"."}),                           # '.' is split off: "St. Louis" never matches
    ("dog's bowl", set()),                                    # apostrophes are not wrapped
    ("", set()),
])
def test_matching_on_hand_made_cases(text, expected):
    matcher = SubstringMatcher(ENTRIES)
    assert {ENTRIES[i] for i in matcher.match(text)} == expected
    assert matcher.match(text) == metaclip_match(text, ENTRIES)


def test_matching_equals_metaclip_substring_check_on_random_text():
    rng = random.Random(0)
    words = ["a", "the", "dog", "Dog", "hot", "cat", "new", "york", "city", "x", ""]
    marks = ["", "", "", ",", ".", ";", ":", "?", "!", "`", "'", "\t", "\n", "-", "  "]
    entries = list(dict.fromkeys(" ".join(rng.choices(words[:-1], k=rng.randint(1, 3))) for _ in range(60)))
    entries += ["dog .", ". dog", ", ,", "a  b", "hot dog , a", "york `"]
    matcher = SubstringMatcher(entries)
    for _ in range(3000):
        text = "".join(rng.choice(words) + rng.choice(marks) + rng.choice([" ", " ", "", "  "])
                       for _ in range(rng.randint(0, 10)))
        assert matcher.match(text) == metaclip_match(text, entries), repr(text)


def test_entries_that_can_never_match_are_recognised():
    assert never_matches("St. Louis") and never_matches("e.g") and never_matches("a\tb") and never_matches("x,y")
    assert not never_matches("dog") and not never_matches(".") and not never_matches("dog , a")
    for entry in ["St. Louis", "x,y z"]:  # and indeed never match, whatever the text
        assert not SubstringMatcher([entry]).match(f"{entry} {entry}.{entry}")


# -- metadata -------------------------------------------------------------------------------------------------
def test_metadata_from_text_and_json(tmp_path):
    text = tmp_path / "meta.txt"
    text.write_text("dog\n  cat  \n\n   \ndog\nSt. Louis\nhot dog\n")
    meta = load_metadata(text)
    assert meta.entries == ["dog", "cat", "St. Louis", "hot dog"]
    assert (meta.blank, meta.duplicates, meta.never_match) == (2, 1, ["St. Louis"])
    as_json = tmp_path / "metadata.json"
    as_json.write_text(json.dumps(["dog", "cat", "dog", ""]))
    assert load_metadata(as_json).entries == ["dog", "cat"]


@pytest.mark.parametrize("content, fragment", [('["dog", 3]', "item 1 is not text (int)"),
                                               ('{"dog": 1}', "must be a list"), ("\n \n", "no metadata entries"),
                                               ("[not json", "unreadable metadata")])
def test_bad_metadata_is_one_clear_error(tmp_path, content, fragment):
    path = tmp_path / ("meta.txt" if content.startswith("\n") else "meta.json")
    path.write_text(content)
    with pytest.raises(DatasetError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_metadata(path)
    with pytest.raises(DatasetError, match="not found"):
        load_metadata(tmp_path / "missing.txt")


# -- balancing ------------------------------------------------------------------------------------------------
def test_entry_probability_is_min_of_one_and_t_over_count():
    assert DEFAULT_T == 20_000
    np.testing.assert_allclose(entry_probabilities([0, 5, 20, 21, 100], 20), [1, 1, 1, 20 / 21, 0.2])
    assert keep_probability([0, 1], [0.5, 0.2]) == pytest.approx(1 - 0.5 * 0.8)
    assert keep_probability([1, 2], [0.1, 1.0, 0.3]) == 1.0


@pytest.fixture()
def pool(tmp_path):
    """2000 pairs of the head entry 'dog' alone, 60 of the tail entry 'cat' alone, 40 with both, 50 unmatched."""
    rows = ([{"image": f"dog/{i}.jpg", "caption": f"the dog number {i}"} for i in range(2000)]
            + [{"image": f"cat/{i}.jpg", "caption": f"the cat number {i}"} for i in range(60)]
            + [{"image": f"both/{i}.jpg", "caption": f"a dog and a cat, {i}"} for i in range(40)]
            + [{"image": f"none/{i}.jpg", "caption": f"a bird {i}"} for i in range(50)])
    random.Random(1).shuffle(rows)
    return write_jsonl(tmp_path / "pool.jsonl", rows), write_metadata(tmp_path / "meta.txt", ["dog", "cat", "fish"])


def test_entries_at_or_below_t_keep_every_pair(pool, tmp_path):
    pool_file, meta = pool
    result = curate(pool_file, meta, tmp_path / "out", t=2040, seed=3, progress=False)  # dog: 2040 = t, cat: 100
    kept = read_manifest(result.manifest)
    assert len(kept) == 2100 == result.summary["pairs_out"] == result.summary["pairs_matched"]
    assert result.summary["pairs_unmatched"] == 50 and result.summary["pairs_in"] == 2150
    assert {row["image"].split("/")[-2] for row in kept} == {"dog", "cat", "both"}
    assert [(e["entry"], e["before"], e["probability"], e["after"]) for e in result.entries] == [
        ("dog", 2040, 1.0, 2040), ("cat", 100, 1.0, 100)]


def test_an_entry_above_t_is_sampled_at_t_over_count_and_tail_pairs_are_always_kept(pool, tmp_path):
    pool_file, meta = pool
    t = 100  # dog: 2040 matches -> p = 100/2040; cat: 100 matches = t -> p = 1
    p = t / 2040
    dog_only = []
    for seed in range(12):
        result = curate(pool_file, meta, tmp_path / f"out{seed}", t=t, seed=seed, progress=False)
        kept = read_manifest(result.manifest)
        folders = [row["image"].split("/")[-2] for row in kept]
        assert folders.count("cat") == 60 and folders.count("both") == 40  # a tail entry: always kept
        assert "none" not in folders
        dog_only.append(folders.count("dog"))
        after = {e["entry"]: e["after"] for e in result.entries}
        assert after == {"dog": dog_only[-1] + 40, "cat": 100}
    n = 12 * 2000
    fraction, sd = sum(dog_only) / n, math.sqrt(p * (1 - p) / n)
    assert abs(fraction - p) < 4.5 * sd, (fraction, p, sd)  # binomial bound; fails with prob < 1e-5 if right
    assert len(set(dog_only)) > 1


def test_each_matched_pair_uses_the_next_draw_against_one_minus_prod_one_minus_p(tmp_path):
    rng = random.Random(5)
    entries = ["red", "green", "blue", "cyan"]
    weights = [20, 8, 3, 1]
    captions = [" ".join(rng.choices(entries, weights, k=rng.randint(0, 3))) or "grey" for _ in range(400)]
    pool_file = write_jsonl(tmp_path / "pool.jsonl", [{"image": f"{i}.png", "caption": c} for i, c in
                                                       enumerate(captions)])
    meta = write_metadata(tmp_path / "meta.txt", entries)
    t = 40
    result = curate(pool_file, meta, tmp_path, t=t, seed=11, progress=False)  # output beside the pool: same paths
    matches = [metaclip_match(c, entries) for c in captions]
    counts = np.bincount([i for m in matches for i in m], minlength=4)
    probability = np.minimum(1.0, t / np.maximum(counts, 1))
    matched = [(i, m) for i, m in enumerate(matches) if m]
    draws = np.random.default_rng(11).random(len(matched))
    expected = [f"{i}.png" for (i, m), u in zip(matched, draws) if u < 1 - np.prod(1 - probability[m])]
    kept = read_manifest(result.manifest)
    assert [row["image"] for row in kept] == expected
    assert all(row["entries"] == [entries[j] for j in matches[int(row["image"][:-4])]] for row in kept)
    assert [e["before"] for e in result.entries] == sorted(counts[counts > 0].tolist(), reverse=True)


def test_same_seed_same_output_other_seed_other_output(pool, tmp_path):
    pool_file, meta = pool
    outputs = [curate(pool_file, meta, tmp_path / f"o{k}", t=100, seed=s, progress=False).manifest.read_bytes()
               for k, s in enumerate([7, 7, 8])]
    assert outputs[0] == outputs[1] and outputs[0] != outputs[2]


def test_report_summary_plot_and_relative_paths(pool, tmp_path):
    pool_file, meta = pool
    result = curate(pool_file, meta, tmp_path / "deep" / "out", t=100, seed=0, progress=False, top=2)
    report = json.loads(result.report_json.read_text())
    s = result.summary
    dog_after = report["entry_counts"][0]["after"]
    assert (s["entries_matched_before"], s["head_entries_before"], s["tail_entries_before"]) == (2, 1, 1)
    assert s["tail_head_ratio_before"] == pytest.approx(100 / 2040, abs=1e-6)
    assert s["tail_head_ratio_after"] == pytest.approx(100 / dog_after, abs=1e-6)
    assert s["tail_share_before"] == pytest.approx(100 / 2140, abs=1e-6)
    assert report["metadata_entries"] == 3 and report["matches_before"] == 2140 and report["max_count_before"] == 2040
    assert s["captions_per_s"] > 0 and s["seconds"]["total"] > 0
    markdown = result.report_md.read_text()
    assert "| dog | 2,040 | 0.04902 |" in markdown and "| cat | 100 | 1 | 100 |" in markdown
    assert "tail/head ratio" in markdown and "captions/s" in markdown
    assert result.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # image paths are rewritten relative to the output folder, so the manifest loader finds the images
    dataset = manifest(result.manifest)
    assert len(dataset) == s["pairs_out"]
    first = read_manifest(result.manifest)[0]["image"]
    assert first.startswith("../../") and (result.manifest.parent / first).resolve() == (tmp_path / first[6:])
    # nothing but the outputs is left in the folder (the pass-1 spill file is gone)
    assert sorted(p.name for p in result.manifest.parent.iterdir()) == [
        "curated.jsonl", "entry_distribution.png", "report.json", "report.md", "skipped.tsv"]


def test_bad_t_is_refused(pool, tmp_path):
    for t in (0, -5, float("nan"), True):
        with pytest.raises(CliplabError, match="t must be"):
            curate(*pool, tmp_path / "out", t=t, progress=False)


# -- bad captions and pool formats ----------------------------------------------------------------------------
def test_empty_and_non_text_captions_are_counted_and_reported_by_line(tmp_path):
    lines = [
        json.dumps({"image": "1.jpg", "caption": "a dog"}),                          # 1 ok
        json.dumps({"image": "2.jpg", "caption": ""}),                               # 2 empty
        json.dumps({"image": "3.jpg", "caption": 42}),                               # 3 non-text
        json.dumps({"image": "4.jpg", "captions": ["the dog", "  ", None, 3.5, {"x": 1}]}),  # 4: ok, empty, ...
        "{not json",                                                                 # 5 malformed
        "",                                                                          # 6 blank: ignored
        json.dumps({"image": "7.jpg"}),                                              # 7 no caption field
        json.dumps({"caption": "a dog"}),                                            # 8 no image
        json.dumps({"image": "9.jpg", "text": "dog \udc80"}),                        # 9 lone surrogate
        json.dumps([1, 2]),                                                          # 10 not an object
        json.dumps({"image": "11.jpg", "captions": []}),                             # 11 empty list
    ]
    pool = tmp_path / "pool.jsonl"
    pool.write_bytes("\n".join(lines).encode() + b"\n\xff\xfe broken utf-8\n")      # 12 invalid UTF-8
    meta = write_metadata(tmp_path / "meta.txt", ["dog"])
    result = curate(pool, meta, tmp_path / "out", seed=0, progress=False)
    s = result.summary
    assert s["captions_skipped"] == {"empty caption": 3, "malformed line": 3, "no caption": 2, "no image": 1,
                                     "non-text caption": 4}
    assert s["pairs_in"] == 2 and s["pairs_out"] == 2 and s["captions_read"] == 15
    rows = list(csv.reader(result.skipped_file.read_text().splitlines(), delimiter="\t"))
    assert rows[0] == ["where", "kind", "detail"]
    where = {(r[0], r[1]) for r in rows[1:]}
    assert {("line 2", "empty caption"), ("line 3", "non-text caption"), ("line 4 caption 2", "empty caption"),
            ("line 4 caption 3", "no caption"), ("line 4 caption 4", "non-text caption"), ("line 5", "malformed line"),
            ("line 7", "no caption"), ("line 8", "no image"), ("line 9", "non-text caption"),
            ("line 12", "malformed line"), ("line 11", "empty caption")} <= where
    assert len(rows) == 1 + 13
    assert any("line 3: non-text caption (int 42)" in e for e in s["skipped_examples"])


def test_csv_tsv_and_coco_pools(tmp_path):
    meta = write_metadata(tmp_path / "meta.txt", ["dog", "cat"])
    with open(tmp_path / "pool.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerows([["image", "caption"], ["a.jpg", "a dog"], ["b.jpg", ""], ["c.jpg", "a cat,\nsleeping"],
                          ["d.jpg"]])
    result = curate(tmp_path / "pool.csv", meta, tmp_path / "csv", progress=False)
    assert [r["image"] for r in read_manifest(result.manifest)] == ["../a.jpg", "../c.jpg"]
    assert result.summary["captions_skipped"] == {"empty caption": 1, "no caption": 1}
    assert "line 3\tempty caption" in result.skipped_file.read_text()
    (tmp_path / "pool.tsv").write_text("path\ttext\nx.jpg\tdog\ny.jpg\tno match\n")
    assert curate(tmp_path / "pool.tsv", meta, tmp_path, progress=False).summary["pairs_out"] == 1
    coco = {"images": [{"image": "images/1.jpg", "captions": ["A dog.", "A cat.", "A bird."]},
                       {"image": "images/2.jpg", "captions": ["", "Dog"]}]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    result = curate(tmp_path / "captions.json", meta, tmp_path / "coco", progress=False)
    assert [r["caption"] for r in read_manifest(result.manifest)] == ["A dog.", "A cat."]
    assert "image 2 caption 1\tempty caption" in result.skipped_file.read_text()
    official = {"images": [{"id": 7, "file_name": "7.jpg"}],
                "annotations": [{"image_id": 7, "caption": "a cat"}, {"image_id": 8, "caption": "a dog"}]}
    (tmp_path / "captions_val.json").write_text(json.dumps(official))
    result = curate(tmp_path / "captions_val.json", meta, tmp_path / "official", progress=False)
    assert read_manifest(result.manifest) == [{"image": "../7.jpg", "caption": "a cat", "entries": ["cat"]}]
    assert result.summary["captions_skipped"] == {"no image": 1}


@pytest.mark.parametrize("name, content, fragment", [
    ("pool.txt", "x", "unknown pool format"), ("pool.csv", "file,label\na,b\n", "needs an 'image'"),
    ("pool.json", "{bad", "not a JSON document"), ("pool.json", '{"x": 1}', "COCO-style")])
def test_unusable_pool_files_are_one_clear_error(tmp_path, name, content, fragment):
    (tmp_path / name).write_text(content)
    meta = write_metadata(tmp_path / "meta.txt", ["dog"])
    with pytest.raises(DatasetError, match=fragment):
        curate(tmp_path / name, meta, tmp_path / "out", progress=False)
    with pytest.raises(DatasetError, match="not found"):
        curate(tmp_path / "missing.jsonl", meta, tmp_path / "out", progress=False)


# -- bounded memory -------------------------------------------------------------------------------------------
def test_memory_does_not_grow_with_the_number_of_captions(tmp_path):
    """Pass 1 keeps counts only (matched ids are spilled to disk): 10x the captions, the same peak."""
    meta = write_metadata(tmp_path / "meta.txt", [f"w{i}" for i in range(200)])
    pools = []
    for n in (1_000, 10_000):
        rows = [{"image": f"{i}.jpg", "caption": f"w{i % 200} and w{(i * 7) % 200} in a longer caption {i}"}
                for i in range(n)]
        pools.append(write_jsonl(tmp_path / f"pool{n}.jsonl", rows))
    curate(pools[0], meta, tmp_path / "warm", t=50, progress=False)  # matplotlib and friends imported
    peaks = []
    for pool in pools:
        tracemalloc.start()
        try:
            curate(pool, meta, tmp_path / pool.stem, t=50, progress=False)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    # one small list per caption kept in memory would add > 9,000 * 80 bytes = 720 kB
    assert peaks[1] - peaks[0] < 500_000, peaks


# -- command line ---------------------------------------------------------------------------------------------
def test_cli_runs_end_to_end(pool, tmp_path):
    pool_file, meta = pool
    runner = CliRunner()
    result = runner.invoke(app, ["curate", str(pool_file), "--metadata", str(meta), "--t", "100", "--seed", "2",
                                 "--output", str(tmp_path / "cli"), "--top", "2", "-q"])
    assert result.exit_code == 0, result.output
    assert "2,100 matched of 2,150" in result.output and "tail/head ratio" in result.output
    assert "dog" in result.output and "captions/s" in result.output
    api = curate(pool_file, meta, tmp_path / "api", t=100, seed=2, progress=False)
    assert (tmp_path / "cli" / "curated.jsonl").read_bytes() == api.manifest.read_bytes()
    bad = runner.invoke(app, ["curate", str(pool_file), "--metadata", str(tmp_path / "nope.txt"), "-q",
                              "--output", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "error:" in bad.output and "nope.txt" in bad.output
    assert "Traceback" not in bad.output
    assert runner.invoke(app, ["curate", str(pool_file), "--metadata", str(meta), "--t", "0"]).exit_code == 2
