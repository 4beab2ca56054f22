"""REAL's synonym counting (paper 36): phrase matching as the authors' FTS5 queries, corpus formats, name choice."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cliplab.data.synonyms import (
    count_synonyms,
    llm_synonyms,
    load_caption_corpus,
    most_frequent_names,
    read_synonyms,
    retrieve,
    tokens,
)
from cliplab.errors import DatasetError, DescriptionError

REPLAY = Path(__file__).resolve().parents[1] / "data" / "real_synonyms_replay.json"

CAPTIONS = [
    "A Sea-Lion resting on the rocks.",      # sea lion, lion
    "the lion king",                          # lion
    "Two lions at the zoo",                   # nothing: no stemming
    "sea lions and a sea lion, sea lion!",    # sea lion (once per caption), lion
    "Lion's mane jellyfish",                  # "Lions" after dropping the apostrophe: nothing
    "seal on a beach; eared seal",            # eared seal
    "sealion pup",                            # only "sealion" (one token)
    "Café au lait cat",                       # cat (diacritics and case fold), cafe
]
SYNONYMS = {"sea lion": ["lion", "eared seal", "sealion"], "cat": ["kitty", "cafe"]}
HAND = {"sea lion": {"sea lion": 2, "lion": 3, "eared seal": 1, "sealion": 1},
        "cat": {"cat": 1, "kitty": 0, "cafe": 1}}


def test_counts_equal_hand_counts():
    assert count_synonyms(CAPTIONS, SYNONYMS) == HAND


def test_tokens_follow_the_fts_cleaning():
    assert tokens("Don't_stop-me  (NOW)!") == ["dont", "stop", "me", "now"]
    assert tokens("Crème brûlée") == ["creme", "brulee"]


def test_relaxed_rejects_a_word_subset_and_strict_takes_the_top():
    counts = count_synonyms(CAPTIONS, SYNONYMS)
    # "lion" (3) is most counted but a subset of "sea lion": kept out, and its count blocks rarer names.
    assert most_frequent_names(counts) == {"sea lion": "sea lion", "cat": "cat"}
    assert most_frequent_names(counts, "strict")["sea lion"] == "lion"
    # equal words in another order replace; ties keep the earlier (own) name
    counts = {"honda accord 2012": {"honda accord 2012": 1, "2012 honda accord": 5, "honda": 9}}
    assert most_frequent_names(counts)["honda accord 2012"] == "honda accord 2012"  # "honda" 9 blocks
    counts = {"honda accord 2012": {"honda accord 2012": 1, "2012 honda accord": 5}}
    assert most_frequent_names(counts)["honda accord 2012"] == "2012 honda accord"
    assert most_frequent_names({"cat": {"cat": 2, "kitty": 2}})["cat"] == "cat"
    assert most_frequent_names({"cat": {"cat": 2, "kitty": 3, "moggy": 7}})["cat"] == "moggy"


def _write_all_formats(tmp_path: Path) -> dict[str, Path]:
    txt = tmp_path / "c.txt"
    txt.write_text("\n".join(CAPTIONS[:4]) + "\n\n" + "\n".join(CAPTIONS[4:]) + "\n", encoding="utf-8")
    jsonl = tmp_path / "c.jsonl"
    rows = [{"caption": c} for c in CAPTIONS[:4]] + [{"text": CAPTIONS[4]}, {"caption": CAPTIONS[5:]}]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"url": ["u"] * len(CAPTIONS), "caption": CAPTIONS}), parquet, row_group_size=3)
    csv = tmp_path / "c.csv"
    csv.write_text("id,text\n" + "".join(f'{i},"{c}"\n' for i, c in enumerate(CAPTIONS)), encoding="utf-8")
    return {"txt": txt, "jsonl": jsonl, "parquet": parquet, "csv": csv}


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet", "csv"])
def test_each_corpus_format_streams_the_same_captions(tmp_path, kind):
    path = _write_all_formats(tmp_path)[kind]
    assert list(load_caption_corpus(path)) == CAPTIONS
    assert count_synonyms(path, SYNONYMS) == HAND


def test_bad_rows_are_reported_with_their_line(tmp_path):
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"caption": "a lion"}\n{not json\n{"url": "x"}\n{"caption": 3}\n{"text": "sea lion"}\n')
    problems: list[str] = []
    assert list(load_caption_corpus(jsonl, problems)) == ["a lion", "sea lion"]
    assert [p.split(": ")[1] for p in problems] == ["line 2", "line 3", "line 4"]
    with pytest.raises(DatasetError, match="line 2"):
        list(load_caption_corpus(jsonl))
    parquet = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"text": ["a lion", None, "cat"]}), parquet)
    problems = []
    assert count_synonyms(parquet, SYNONYMS, problems)["sea lion"]["lion"] == 1
    assert problems == [f"{parquet}: row 2: caption is empty"]


def test_empty_or_unknown_corpus_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DatasetError, match="no captions"):
        count_synonyms(empty, SYNONYMS)
    with pytest.raises(DatasetError, match="no captions"):
        count_synonyms([], SYNONYMS)
    with pytest.raises(DatasetError, match="not found"):
        list(load_caption_corpus(tmp_path / "missing.txt"))
    (tmp_path / "c.xml").write_text("x")
    with pytest.raises(DatasetError, match="format"):
        list(load_caption_corpus(tmp_path / "c.xml"))


def test_many_captions_and_synonyms_in_one_pass():
    corpus = (f"photo {i} of a sea lion on a rock" if i % 3 else f"cat number {i}" for i in range(60_000))
    synonyms = {f"class {k}": [f"synonym {k} x", f"word{k}"] for k in range(1000)} | SYNONYMS
    counts = count_synonyms(corpus, synonyms)
    assert counts["sea lion"]["sea lion"] == counts["sea lion"]["lion"] == 40_000
    assert counts["cat"]["cat"] == 20_000


def test_synonym_file_and_llm(tmp_path):
    path = tmp_path / "syn.json"
    path.write_text(json.dumps({"Sea Lion": ["eared seal"]}))
    assert read_synonyms(path, ["sea lion", "cat"]) == {"sea lion": ["eared seal"], "cat": []}
    path.write_text(json.dumps({"walrus": ["x"]}))
    with pytest.raises(DescriptionError, match="walrus"):
        read_synonyms(path, ["sea lion"])
    found, failures = llm_synonyms(f"replay:{REPLAY}", ["sea lion", "cat", "dog", "fox"])
    assert found == {"sea lion": ["lion", "eared seal"], "cat": ["kitty", "kitten"], "dog": [], "fox": []}
    assert set(failures) == {"dog", "fox"}


def test_retrieve_finds_items_by_any_caption():
    captions = [["a cat"], ["nothing here", "A SEA LION!"], ["two lions"], ["eared seal", "kitty cat"]]
    found = retrieve(captions, SYNONYMS)
    assert found == {"sea lion": [(1, "A SEA LION!"), (3, "eared seal")], "cat": [(0, "a cat"), (3, "kitty cat")]}


def test_llm_synonyms_retry_a_wrong_shape_and_give_up_on_a_down_endpoint(tmp_path):
    from _llm_stub import Stub
    from cliplab.llm import LLM, OpenAICompatible, RetryableError

    class Flaky(LLM):
        def __init__(self):
            super().__init__("flaky", attempts=2, backoff=0.0, cache=tmp_path / "llm")

        def _request(self, prompt, system, json_mode):
            if "cat" in prompt and self.requests == 1:
                return '["kitty", 3]'  # a JSON list, not of strings
            if "dog" in prompt:
                raise RetryableError("server error 503")
            return '["kitty", "cat", " puss "]'

    llm = Flaky()
    found, failures = llm_synonyms(llm, ["cat", "dog"])
    assert found == {"cat": ["kitty", "puss"], "dog": []} and list(failures) == ["dog"]
    assert llm.requests == 2 + 2 and len(list((tmp_path / "llm").glob("*.rejected.json"))) == 1

    with Stub(lambda body, n: (200, "[]", 0)) as stub:
        url = stub.url  # closed: nothing listens there any more
    down = OpenAICompatible(url, "m", attempts=2, backoff=0.0, cache=False)
    found, failures = llm_synonyms(down, [f"class {i}" for i in range(6)])
    assert down.requests == 3 * 2 and all(v == [] for v in found.values()) and len(failures) == 6
    assert failures["class 5"].startswith("not asked: the endpoint failed 3 times in a row")
