"""Classification by description on CIFAR-10 test: templates vs CuPL vs DCLIP-style vs WaffleCLIP vs PerceptionCLIP.

One model for every row: the ``cifar10-signal`` recipe (trained here on CIFAR-10 train images with template
captions; weights that carry signal, but a small model, not CLIP: no real CLIP weights can be had here). Text
where an LLM would be needed comes from ../shared/descriptions (CuPL's CIFAR-10 sentences, written by GPT-3 for
the CuPL paper). There is no DCLIP file for CIFAR-10, so the DCLIP rows use (a) DCLIP's scoring (mean of the
per-sentence similarities) on CuPL's sentences and (b) DCLIP's phrasing on the short descriptors in
tests/data/describe_replay_cifar10.json (hand-written for the tests in the DCLIP format; a stand-in, said so in
the table). WaffleCLIP: 15 pairs of random words/characters, seeds 0-2. PerceptionCLIP: the built-in contextual
attributes, the weighted two-step variant. Then paper 30's semantic-vs-ensembling split, and the cost of each
head (text embeddings, LLM calls a generation needs, seconds) for CIFAR-10 and for a 1000-class label set.

    python benchmarks/descriptions_cifar10.py [--model recipe:cifar10-signal]
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import DATA_ROOT, benchmark_model, header, log, model_info, write_results
from cliplab.data import load_dataset
from cliplab.data.describe import build_prompts
from cliplab.eval.descriptions import rows as semantic_rows
from cliplab.eval.descriptions import semantic_vs_ensembling
from cliplab.features import embed_images
from cliplab.heads import create_head
from cliplab.llm import load_llm

SHARED = DATA_ROOT.parent / "descriptions"
CUPL_CIFAR10 = SHARED / "cupl" / "full_prompts" / "cifar10_prompts_full.json"
CUPL_IMAGENET = SHARED / "cupl" / "base_prompts" / "imagenet_prompts_base.json.gz"
DCLIP_IMAGENET = SHARED / "dclip" / "descriptors_imagenet.json"
REPLAY = Path(__file__).resolve().parents[1] / "tests" / "data" / "describe_replay_cifar10.json"
FUDD_K = 5


def _json(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return json.load(handle)


def replay_descriptors(names: list[str]) -> dict[str, list[str]]:
    """The hand-written DCLIP-format descriptors of the tests' replay file, through cliplab's own generator."""
    from cliplab.data.describe import generate_descriptions

    found, failures = generate_descriptions(load_llm(f"replay:{REPLAY}"), names, "dclip", progress=False)
    if failures:
        raise SystemExit(f"replay file misses classes: {failures}")
    return found


def fit_timed(name: str, backbone, names, **params):
    """A head fitted on a cold text cache: (head, seconds, text embeddings computed)."""
    cache = tempfile.mkdtemp(prefix="cliplab-desc-")
    began = time.perf_counter()
    head = create_head(name, backbone=backbone, class_names=names, cache_dir=cache, **params).fit()
    seconds = time.perf_counter() - began
    summary = head.fit_summary() if hasattr(head, "fit_summary") else {}
    if "text_embeddings" in summary:
        count = int(summary["text_embeddings"])
    else:
        count = len({s for group in head.sentences() for s in group})
    return head, seconds, count


def accuracy(head, X, y) -> float:
    return float((head.predict(X) == y).mean())


def fudd_pairs(head, X, k: int) -> tuple[int, int]:
    """Distinct top-k class sets and distinct class pairs among them (FuDD's LLM questions) on these images."""
    order = np.argsort(-head.logits(X), axis=1)[:, :k]
    sets = {tuple(sorted(row)) for row in order.tolist()}
    pairs = {pair for s in sets for pair in itertools.combinations(s, 2)}
    return len(sets), len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="recipe:cifar10-signal")
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    backbone, weights = benchmark_model(args.model)
    test = load_dataset("cifar10", root=DATA_ROOT, split="test")
    features = embed_images(backbone, test, progress=False)
    X, y = np.asarray(features.features), np.asarray(features.labels)
    names = list(test.class_names)
    cupl = _json(CUPL_CIFAR10)
    descriptors = replay_descriptors(names)

    rows, record_rows = [], []

    def add(label: str, method: str, text: str, heads_and_costs: list[tuple], llm_calls: str) -> None:
        accs = [accuracy(h, X, y) for h, _, _ in heads_and_costs]
        seconds = float(np.mean([s for _, s, _ in heads_and_costs]))
        texts = heads_and_costs[0][2]
        shown = f"{100 * np.mean(accs):.2f}" + (f" ± {100 * np.std(accs):.2f}" if len(accs) > 1 else "")
        rows.append(f"| {label} | `{method}` | {text} | {shown} | {texts} | {llm_calls} | {seconds:.2f} |")
        record_rows.append({"label": label, "method": method, "text": text, "top1": accs, "text_embeddings": texts,
                            "llm_calls_to_generate": llm_calls, "fit_seconds": seconds})
        log(rows[-1])

    n = len(names)
    per_class = {style: len(build_prompts(["x"], style)["x"]) for style in ("cupl", "dclip")}
    q_cupl, q_dclip = per_class["cupl"] * n, per_class["dclip"] * n
    add("templates (CLIP_benchmark's 18)", "zeroshot", "-", [fit_timed("zeroshot", backbone, names,
        templates="cifar10")], "0")
    add("CuPL", "cupl", "CuPL's CIFAR-10 sentences (GPT-3)", [fit_timed("cupl", backbone, names, descriptions=cupl)],
        f"{q_cupl} (cliplab describe --style cupl: {per_class['cupl']} questions/class)")
    add("CuPL + templates", "cupl", "CuPL's sentences + the 18 templates",
        [fit_timed("cupl", backbone, names, descriptions=cupl, templates="cifar10")], f"{q_cupl}")
    add("DCLIP scoring of CuPL's sentences", "dclip", "CuPL's sentences, plain mean of similarities",
        [fit_timed("dclip", backbone, names, descriptions=cupl, phrase=False)], f"{q_cupl}")
    add("DCLIP", "dclip", "hand-written DCLIP-format descriptors (stand-in for an LLM)",
        [fit_timed("dclip", backbone, names, descriptions=descriptors)], f"{q_dclip} ({per_class['dclip']} "
        "question/class)")
    add("DCLIP in the 18 templates", "dclip", "the same descriptors, each in CLIP_benchmark's 18 CIFAR-10 templates",
        [fit_timed("dclip", backbone, names, descriptions=descriptors, templates="cifar10")], f"{q_dclip}")
    add("WaffleCLIP control", "waffle", "15 random word + 15 random character descriptors",
        [fit_timed("waffle", backbone, names, seed=s) for s in seeds], "0")
    add("PerceptionCLIP", "perceptionclip", "built-in contextual attributes, weighted two-step",
        [fit_timed("perceptionclip", backbone, names)], "0")

    zeroshot5 = create_head("zeroshot", backbone=backbone, class_names=names, templates=("a photo of a {c}.",),
                            cache_dir=tempfile.mkdtemp()).fit()
    fudd_sets, fudd_q = fudd_pairs(zeroshot5, X, FUDD_K)

    log("semantic vs ensembling (paper 30)")
    semantic = {}
    for label, source in (("hand-written descriptors", descriptors), ("CuPL sentences", cupl)):
        semantic[label] = semantic_vs_ensembling(backbone, (X, y), names, source, seeds=seeds,
                                                 cache_dir=tempfile.mkdtemp())

    log("costs for a 1000-class label set")
    dclip_1k = _json(DCLIP_IMAGENET)
    cupl_1k = _json(CUPL_IMAGENET)
    names_1k = list(dclip_1k)
    costs_1k = []
    for label, method, class_names, params, llm in (
        ("templates (imagenet80)", "zeroshot", names_1k, {"templates": "imagenet80"}, "0"),
        ("CuPL (base prompts, 998 classes)", "cupl", list(cupl_1k), {"descriptions": cupl_1k},
         f"{per_class['cupl'] * len(cupl_1k)}"),
        ("DCLIP (DCLIP's ImageNet descriptors)", "dclip", names_1k, {"descriptions": dclip_1k},
         f"{per_class['dclip'] * len(names_1k)}"),
        ("WaffleCLIP control", "waffle", names_1k, {}, "0"),
        ("PerceptionCLIP", "perceptionclip", names_1k, {}, "0"),
    ):
        _, seconds, texts = fit_timed(method, backbone, class_names, **params)
        costs_1k.append({"label": label, "method": method, "classes": len(class_names), "text_embeddings": texts,
                         "llm_calls_to_generate": llm, "fit_seconds": round(seconds, 2)})
        log(costs_1k[-1])

    lines = [f"# Classification by description: CIFAR-10 test ({len(y)} images), {args.model}", "",
             f"**Weights: {weights}.** A small model trained here on CIFAR-10 train images with *template* captions "
             "(not CLIP): prompts shaped like its training captions are at an advantage, so these rows test the "
             "pipeline and the heads' mechanics on real text, not the papers' claims on CLIP.", "",
             "| method | head | text | top-1 % | text embeddings | LLM calls to generate | fit s (cold cache) |",
             "|---|---|---|---:|---:|---|---:|", *rows, "",
             f"FuDD (top-{FUDD_K} ambiguous sets, pairwise questions): on these 10,000 images the zero-shot top-"
             f"{FUDD_K} gives {fudd_sets} distinct class sets and {fudd_q} distinct class pairs, i.e. {fudd_q} LLM "
             f"calls (each pair asked once, cached on disk); at most C(10,2) = 45. Not scored: it needs an LLM, and "
             "none can be reached from this machine.", "",
             "## Semantic gain vs ensembling gain (paper 30's protocol)", ""]
    for label, result in semantic.items():
        table = semantic_rows(result)
        lines += [f"Descriptions: {label}.", "", f"| {' | '.join(table[0])} |", "|---|---:|"]
        lines += [f"| {' | '.join(str(c) for c in r)} |" for r in table[1:]]
        lines.append("")
    lines += ["## Cost on a 1000-class label set (ImageNet names)", "",
              "| method | classes | text embeddings | LLM calls to generate | fit s (cold cache) |",
              "|---|---:|---:|---|---:|"]
    lines += [f"| {c['label']} | {c['classes']} | {c['text_embeddings']} | {c['llm_calls_to_generate']} | "
              f"{c['fit_seconds']:.1f} |" for c in costs_1k]
    lines += ["", f"LLM calls: `cliplab describe` asks {per_class['cupl']} questions per class for CuPL and "
              f"{per_class['dclip']} for DCLIP (answers cached on disk); FuDD asks one question per class pair that "
              "occurs in some image's top-k set (at most C(1000,2) = 499,500 for 1000 classes, in practice far "
              "fewer: one per pair the images actually confuse); REAL asks one synonym question per class. "
              "Seconds: embedding the prompts with this model's small text tower on 2 CPU cores."]
    record = header("descriptions_cifar10", __doc__.strip().splitlines()[0], False)
    record.update(model=model_info(backbone), weights_note=weights, rows=record_rows,
                  fudd={"k": FUDD_K, "class_sets": fudd_sets, "pairs": fudd_q}, semantic=semantic,
                  costs_1000=costs_1k)
    write_results("descriptions_cifar10", record, "\n".join(lines))
    log("\n".join(lines))


if __name__ == "__main__":
    main()
