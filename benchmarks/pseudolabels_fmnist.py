"""Paper 23's three settings on Fashion-MNIST with GRIP's textual prompts: test accuracy and pseudolabel accuracy
per round of pseudolabel growth, beside zero-shot, with the signal-carrying recipe model (trained on CIFAR-10 train
images with template captions: it never saw Fashion-MNIST).

CPU-sized, and so not the paper's recipe: seeded subsamples (an unlabelled pool of ``--pool`` train images, ``--test``
test images), ``--epochs`` epochs a round (the authors: 150) with 1 warm-up epoch (theirs 5), ``--step-quantile``
(the authors: 10, i.e. 10 rounds); the authors' SGD (lr 0.1, momentum 0.9, weight decay 0.1, batch 16) otherwise.

- semi-supervised: 2 labelled images per class (the authors' N_LABEL) + the unlabelled pool (train images).
- transductive zero-shot: 5 seeded seen classes with ``--seen-per-class`` labelled train images each; the unlabelled
  data are the test images of the 5 unseen classes (the authors' protocol: their unlabelled set is the unseen
  classes' test images); pseudolabels only among the unseen classes; scored on the whole test sample (seen, unseen,
  harmonic mean, as the paper).
- unsupervised: the pool alone, no label read.

Round 0 is zero-shot CLIP (the templates' class weights). The pseudolabel accuracy of round r is that of the
pseudolabels round r trained on (chosen by round r-1's model), against the true labels, which only this script reads.
The visual modalities need a ViT image tower; the recipe model's is a ResNet (refused in one line), so only the
textual prompts run here.

    python benchmarks/pseudolabels_fmnist.py [--quick] [--model recipe:cifar10-signal]

Writes benchmarks/results/pseudolabels_fmnist.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA_ROOT, CpuAccount, built_model, header, load_average, log, md_table, model_info, write_results  # noqa: E402


def load(spec: str):
    """(backbone, note); a recipe model must already be built (never trains here)."""
    return built_model(spec, held_label="CIFAR-10 val zero-shot", after="; it never saw Fashion-MNIST",
                       random_note="random weights: the numbers say nothing about the method")


def pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def accuracy_of(weights: np.ndarray, X: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((X @ weights).argmax(axis=1) == y)) if len(y) else float("nan")


def round_table(head, pool_X, pool_y, test_X, test_y, seen=None, unseen=None) -> list[dict]:
    """Per round: K, test accuracy (and seen/unseen/harmonic for transductive) from ``round_weights_``, and the
    accuracy of the pseudolabels each round trained on, recomputed from the previous round's weights."""
    from cliplab.train.pseudolabels import select_top_k

    rows = []
    targets = head.target_classes_
    for r, weights in enumerate(head.round_weights_):
        row = {"round": r, "k": None if r == 0 else head.schedule_[r - 1], "test_acc": accuracy_of(weights, test_X,
                                                                                                    test_y)}
        if seen is not None:
            s, u = np.isin(test_y, seen), np.isin(test_y, unseen)
            row["seen_acc"] = accuracy_of(weights, test_X[s], test_y[s])
            row["unseen_acc"] = accuracy_of(weights, test_X[u], test_y[u])
            a, b = row["seen_acc"], row["unseen_acc"]
            row["harmonic"] = 2 * a * b / (a + b) if a + b else 0.0
        if r > 0 and row["k"]:
            logits = head.logit_scale_ * (pool_X.astype(np.float64) @ head.round_weights_[r - 1][:, targets])
            logits -= logits.max(axis=1, keepdims=True)
            probs = np.exp(logits)
            picked, labels = select_top_k(probs / probs.sum(axis=1, keepdims=True), row["k"], rule=head.selection)
            row["pseudolabels"] = int(len(picked))
            row["pseudolabel_acc"] = float(np.mean(targets[labels] == pool_y[picked]))
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="recipe:cifar10-signal")
    parser.add_argument("--pool", type=int, default=None, help="unlabelled train images (default 2000, quick 400)")
    parser.add_argument("--test", type=int, default=None, help="test images (default 2000, quick 400)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs a round (default 10, quick 2)")
    parser.add_argument("--step-quantile", type=int, default=None, help="default 20 (5 rounds), quick 50")
    parser.add_argument("--seen-per-class", type=int, default=None, help="transductive labelled (default 50)")
    parser.add_argument("--settings", default="semi-supervised,transductive,unsupervised")
    parser.add_argument("--dump-logits", default=None, help="write the pool's features and round-0 weights (npz)")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--note", default=None, help="what the model is (replaces the loader's note)")
    parser.add_argument("--selection", default="balanced", choices=["balanced", "authors"])
    parser.add_argument("--dataset", default="fashion_mnist", help="a named dataset (results: pseudolabels_<name>; "
                        "fashion_mnist writes pseudolabels_fmnist)")
    parser.add_argument("--pool-split", default="train", choices=["train", "test"],
                        help="where the unlabelled pool comes from (test: disjoint from the test sample)")
    parser.add_argument("--model-label", default=None, help="the model as the title names it")
    args = parser.parse_args()
    quick = args.quick
    pool_n = args.pool or (400 if quick else 2000)
    test_n = args.test or (400 if quick else 2000)
    epochs = args.epochs or (2 if quick else 10)
    quantile = args.step_quantile or (50 if quick else 20)
    seen_per_class = args.seen_per_class or (10 if quick else 50)

    from cliplab.data import load_dataset
    from cliplab.data.base import Subset
    from cliplab.eval.inputs import build_head, resolve_templates
    from cliplab.features.embed import embed_images

    record = header("pseudolabels_fmnist", __doc__.splitlines()[0], quick)  # the script's name, any --dataset
    backbone, note = load(args.model)
    note = args.note or note
    dataset = args.dataset
    title = {"fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10"}.get(dataset, dataset)
    result_name = "pseudolabels_fmnist" if dataset == "fashion_mnist" else f"pseudolabels_{dataset}"
    train = load_dataset(dataset, DATA_ROOT, "train")
    test = load_dataset(dataset, DATA_ROOT, "test")
    names = list(train.class_names)
    n_classes = len(names)
    templates = resolve_templates("grip", None, dataset)
    rng = np.random.default_rng(0)
    train_labels, test_labels = np.asarray(train.labels), np.asarray(test.labels)
    labelled_idx = np.concatenate([rng.choice(np.flatnonzero(train_labels == c), 2, replace=False)
                                   for c in range(n_classes)])
    rest = np.setdiff1d(np.arange(len(train_labels)), labelled_idx)
    pool_source = train if args.pool_split == "train" else test
    if args.pool_split == "train":
        pool_idx = np.sort(rng.choice(rest, pool_n, replace=False))
        test_idx = np.sort(rng.choice(len(test_labels), test_n, replace=False))
    else:  # pool and test sample: disjoint draws from the test split
        drawn = rng.choice(len(test_labels), pool_n + test_n, replace=False)
        pool_idx, test_idx = np.sort(drawn[:pool_n]), np.sort(drawn[pool_n:])
    seen = np.sort(rng.permutation(n_classes)[:n_classes // 2])
    unseen = np.setdiff1d(np.arange(n_classes), seen)
    seen_rest = np.setdiff1d(rest, pool_idx) if args.pool_split == "train" else rest
    seen_idx = np.concatenate([rng.choice(seen_rest[train_labels[seen_rest] == c], seen_per_class, replace=False)
                               for c in seen])

    def embed(dataset, indices):
        return embed_images(backbone, Subset(dataset, indices), args.cache_dir, progress=False)

    log(f"embedding {len(labelled_idx) + pool_n + len(seen_idx)} train and {test_n} test images")
    with CpuAccount() as embedding:
        labelled, pool, seen_train, test_f = (embed(train, labelled_idx), embed(pool_source, pool_idx),
                                              embed(train, seen_idx), embed(test, test_idx))
    zeroshot = build_head("zeroshot", backbone, names, dataset_name=dataset, cache_dir=args.cache_dir).fit()
    zs_acc = float(zeroshot.score(test_f.features, test_f.labels))
    record.update(model=args.model, weights=note, model_info=model_info(backbone), templates=templates,
                  load_before=load_average(), embedding=embedding.result, zero_shot_test_acc=zs_acc,
                  sizes={"pool": pool_n, "test": test_n, "labelled_per_class": 2, "seen_per_class": seen_per_class},
                  seen_classes=[names[c] for c in seen], unseen_classes=[names[c] for c in unseen],
                  epochs_per_round=epochs, step_quantile=quantile, selection=args.selection, dataset=dataset,
                  pool_split=args.pool_split)
    if args.dump_logits:
        np.savez(args.dump_logits, F=pool.features, T=zeroshot.weights_, scale=zeroshot.logit_scale_,
                 labels=pool.labels)
    params = dict(step_quantile=quantile, max_epoch=epochs, warmup_epochs=1, progress=False, selection=args.selection)
    results = {}
    for setting in args.settings.split(","):
        head = build_head("grip", backbone, names, dataset_name=dataset, cache_dir=args.cache_dir,
                          params=dict(params, setting=setting))
        log(f"{setting}: fitting")
        with CpuAccount() as cpu, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if setting == "semi-supervised":
                head.fit(labelled.features, labelled.labels, unlabelled=pool)
                pool_X, pool_y = pool.features, pool.labels
            elif setting == "transductive":
                unseen_test = np.isin(test_f.labels, unseen)
                head.fit(seen_train.features, seen_train.labels, unlabelled=test_f.features[unseen_test])
                pool_X, pool_y = test_f.features[unseen_test], test_f.labels[unseen_test]
            else:  # unsupervised: the pool is X; its labels are not read (zeros passed)
                head.fit(pool.features, np.zeros(len(pool.features), dtype=np.int64))
                pool_X, pool_y = pool.features, pool.labels
        rounds = round_table(head, pool_X, pool_y, test_f.features, test_f.labels,
                             *((seen, unseen) if setting == "transductive" else ()))
        results[setting] = {"rounds": rounds, "fit": cpu.result, "head_rounds": head.rounds_,
                            "pool": head.pool_size_}
        log(f"{setting}: " + ", ".join(f"r{r['round']} {pct(r['test_acc'])}" for r in rounds)
            + f" ({cpu.result['wall_s']:.0f} s)")
    record.update(results=results, load_after=load_average())

    body = [f"# Pseudolabel prompt tuning (GRIP, paper 23) · {args.model_label or args.model} · {title}", "",
            f"Model: {note}. Textual prompts (`grip`), templates `{templates}`; zero-shot test top-1 "
            f"{pct(zs_acc)}%.", "",
            f"CPU-sized, not the paper's recipe: pool {pool_n} {args.pool_split} images, test sample {test_n} "
            "(seeded, disjoint), "
            f"{epochs} epochs a round (authors 150), 1 warm-up epoch (authors 5), step_quantile {quantile} "
            f"({100 // quantile} rounds; authors 10 -> 10 rounds), pseudolabel selection `{args.selection}`, the "
            "authors' SGD otherwise. Round 0 = zero-shot. "
            "Pseudolabel accuracy: of the pseudolabels that round trained on (true labels read by this script only).",
            ""]
    for setting, result in results.items():
        fit = result["fit"]
        body += [f"## {setting}", "",
                 f"Fit: {fit['wall_s']:.0f} s wall, {fit['own_cpu_s']:.0f} CPU s (foreign load "
                 f"{fit['foreign_load']:.1f} cores); pool {result['pool']}.", ""]
        if setting == "transductive":
            body += [f"Seen: {', '.join(record['seen_classes'])} ({seen_per_class} labelled train images each); "
                     f"unseen (pseudolabelled, test images): {', '.join(record['unseen_classes'])}.", "",
                     md_table(["round", "K per class", "pseudolabels", "pseudolabel acc %", "test seen %",
                               "test unseen %", "harmonic %", "test all %"],
                              [[r["round"], r["k"] if r["k"] is not None else "-", r.get("pseudolabels", "-"),
                                pct(r.get("pseudolabel_acc")), pct(r["seen_acc"]), pct(r["unseen_acc"]),
                                pct(r["harmonic"]), pct(r["test_acc"])] for r in result["rounds"]]), ""]
        else:
            body += [md_table(["round", "K per class", "pseudolabels", "pseudolabel acc %", "test top-1 %"],
                              [[r["round"], r["k"] if r["k"] is not None else "-", r.get("pseudolabels", "-"),
                                pct(r.get("pseudolabel_acc")), pct(r["test_acc"])] for r in result["rounds"]]), ""]
    write_results(result_name, record, "\n".join(body))


if __name__ == "__main__":
    main()
