"""SCE (paper 20) and concept-association bias (paper 25) of the signal-carrying recipe model on CIFAR-10 test.

SCE: image features paired with one seeded CIFAR-10 template prompt of their class (true pairs), and the same
prompts shuffled across images (a control: texts independent of the images), for the Gaussian kernel at several
bandwidths and the cosine kernel; the Schur-complement correction fitted on half the pairs and applied to the other
half, scored by zero-shot top-1 before and after (removing the prompt's influence should remove class information).
CAB: seeded composites of a CIFAR-10 test image and a distractor of another class at several distractor sizes
(class attributes), and colour probes (the model was trained on class-name captions only: it does not know colours).

    python benchmarks/analyses_signal.py [--quick] [--model recipe:cifar10-signal]

Writes benchmarks/results/analyses_signal.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA_ROOT, CpuAccount, built_model, header, load_average, log, md_table, model_info, write_results  # noqa: E402


def load(spec: str):
    """(backbone, note); a recipe model must already be built (never trains here)."""
    return built_model(spec, held_label="val zero-shot", after=": weights that carry signal, but a small model that "
                       "has seen these classes, not a general CLIP", random_note="random weights")


def sce_part(backbone, test, cache_dir, pairs: int, rff_dim: int) -> tuple[list[dict], dict]:
    from cliplab.analysis.sce import correct_embeddings, correction_matrix, paired_features, sce_score
    from cliplab.features.text import class_weights

    text, image, info = paired_features(backbone, test, templates="cifar10", limit=pairs, seed=0,
                                        cache_dir=cache_dir, progress=False)
    shuffled = text[np.random.default_rng(1).permutation(len(text))]
    rows = []
    settings = [("gaussian", 3.5), ("gaussian", 1.0), ("gaussian", 0.5), ("cosine", None)]
    for kernel, sigma in settings:
        for pairing, x in (("true pairs", text), ("shuffled (control)", shuffled)):
            with CpuAccount() as cpu:
                result = sce_score(x, image, kernel=kernel, sigma=sigma or 1.0, rff_dim=rff_dim, seed=0)
            rows.append({"kernel": kernel, "sigma": sigma, "rff_dim": rff_dim if kernel == "gaussian" else None,
                         "pairing": pairing, **{k: v for k, v in result.as_dict().items()
                                                if k in ("sce", "prompt_diversity", "complement_share",
                                                         "explained_share", "n")},
                         "wall_s": cpu.result["wall_s"], "cpu_s": cpu.result["own_cpu_s"]})
            log(f"SCE {kernel} sigma={sigma} {pairing}: {result.sce:.3f} / prompts {result.prompt_diversity:.3f}, "
                f"explained {100 * result.explained_share:.1f}%")
    # correction: Gamma on the first half of the pairs, applied to the second half
    half = len(text) // 2
    gamma = correction_matrix(text[:half], image[:half])
    corrected = correct_embeddings(image[half:], text[half:], gamma)
    weights = class_weights(backbone, test.class_names, "cifar10", cache_dir=cache_dir)
    labels = _pair_labels(test, pairs)
    assert len(labels) == len(text), "an image could not be read: the pairs no longer follow the seeded draw"
    held_labels = labels[half:]

    def top1(features):
        norm = features / np.linalg.norm(features, axis=1, keepdims=True)
        return float((np.argmax(norm @ weights, axis=1) == held_labels).mean())

    correction = {"reference_pairs": half, "held_out_pairs": len(text) - half, "kernel": "cosine",
                  "zeroshot_top1_before": top1(image[half:]), "zeroshot_top1_after": top1(corrected),
                  "chance": 1 / len(test.class_names)}
    log(f"correction: zero-shot top-1 {100 * correction['zeroshot_top1_before']:.1f}% -> "
        f"{100 * correction['zeroshot_top1_after']:.1f}%")
    return rows, {"pairs": info["pairs"], "texts": info["texts"], "correction": correction}


def _pair_labels(test, pairs: int) -> np.ndarray:
    """Labels of the images ``paired_features(limit=pairs, seed=0)`` drew (the same seeded subset, in order)."""
    indices = np.sort(np.random.default_rng(0).choice(len(test), size=pairs, replace=False))
    return np.asarray(test.labels)[indices]


def cab_part(backbone, test, cache_dir, probes: int, sizes: list[float]) -> list[dict]:
    from cliplab.analysis.cab import measure_cab

    rows = []
    cases = [("class", size, False) for size in sizes] + [("colour", 0.5, False), ("colour", 0.5, True)]
    for attribute, size, name_object in cases:
        with CpuAccount() as cpu:
            result = measure_cab(backbone, test, attribute=attribute, size=size, probes=probes, seed=0,
                                 templates="cifar10" if attribute == "class" else None, name_object=name_object,
                                 cache_dir=cache_dir, progress=False)
        rows.append({"attribute": attribute + (" (object named)" if name_object else ""), "size": size,
                     **result["summary"], "wall_s": cpu.result["wall_s"], "cpu_s": cpu.result["own_cpu_s"]})
        s = result["summary"]
        log(f"CAB {attribute} size={size}: known {s['known']}/{s['probes']}, CAB {s['cab']}, kept {s['kept']}")
    return rows


def pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="recipe:cifar10-signal")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--note", default=None, help="What the weights are, where --model is a folder (e.g. a "
                        "snapshot of a recipe build's checkpoint).")
    args = parser.parse_args()
    from cliplab.data import load_dataset

    record = header("analyses_signal", __doc__.splitlines()[0], args.quick)
    backbone, note = load(args.model)
    note = args.note or note
    test = load_dataset("cifar10", DATA_ROOT, "test")
    pairs, rff_dim, probes = (400, 100, 100) if args.quick else (2000, 500, 500)
    sizes = [0.0, 0.25, 0.4, 0.5, 0.6]
    record.update(model=args.model, weights=note, model_info=model_info(backbone), load_before=load_average())
    with CpuAccount() as total:
        sce_rows, sce_info = sce_part(backbone, test, args.cache_dir, pairs, rff_dim)
        cab_rows = cab_part(backbone, test, args.cache_dir, probes, sizes)
    record.update(sce=sce_rows, sce_info=sce_info, cab=cab_rows, total=total.result, load_after=load_average())
    correction = sce_info["correction"]
    shown = args.model if not args.note else Path(args.model).name
    body = [f"# SCE and concept-association bias · {shown} · CIFAR-10 test", "", f"Model: {note}.", "",
            f"## SCE (paper 20): {sce_info['pairs']} image/prompt pairs ({sce_info['texts']})", "",
            "SCE = entropy of the Schur complement (image diversity the prompts do not explain); prompt diversity "
            "= the same of the explained part; shares of trace C_yy. Shuffled: each image paired with another "
            "image's prompt (texts independent of the images).", "",
            md_table(["kernel", "sigma", "pairing", "SCE", "prompt diversity", "unexplained", "explained", "wall s",
                      "CPU s"],
                     [[r["kernel"], r["sigma"] if r["sigma"] is not None else "-", r["pairing"], round(r["sce"], 3),
                       round(r["prompt_diversity"], 3), pct(r["complement_share"]), pct(r["explained_share"]),
                       round(r["wall_s"], 1), round(r["cpu_s"], 1)] for r in sce_rows]), "",
            f"Correction y' = y - x Gamma* (cosine kernel, Gamma* from {correction['reference_pairs']} pairs) on "
            f"{correction['held_out_pairs']} held-out pairs: zero-shot top-1 {pct(correction['zeroshot_top1_before'])}"
            f" before, {pct(correction['zeroshot_top1_after'])} after (chance {pct(correction['chance'])}).", "",
            f"## Concept-association bias (paper 25): {probes} seeded probes per row", "",
            "Known = the object alone gets its own attribute; CAB = among known probes, the distractor's attribute "
            "wins on the composite; kept = the object's attribute still wins; distractor wins (all) over every "
            "probe, and over the objects alone (chance level: no distractor there).", "",
            md_table(["attribute", "distractor size", "known", "CAB", "kept", "distractor wins (all)",
                      "distractor wins (object alone)", "wall s"],
                     [[r["attribute"], r["size"], f"{r['known']}/{r['probes']}", pct(r["cab"]), pct(r["kept"]),
                       pct(r["distractor_rate"]), pct(r["solo_distractor_rate"]), round(r["wall_s"], 1)]
                      for r in cab_rows]), "",
            f"Total: {total.result['wall_s']:.0f} s wall, {total.result['own_cpu_s']:.0f} CPU s (load before "
            f"{record['load_before']}, after {record['load_after']})."]
    write_results("analyses_signal" + ("_quick" if args.quick else ""), record, "\n".join(body))


if __name__ == "__main__":
    main()
