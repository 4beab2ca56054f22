"""NoLA (paper 2) and paper 23's GRIP without labels on Fashion-MNIST's unlabelled train split, beside zero-shot, with
the signal-carrying recipe model (trained on CIFAR-10 train images with template captions: it never saw
Fashion-MNIST) and a random timm ViT standing in for DINO (no DINO weights are available here).

CPU-sized, not the papers' recipes: a seeded pool of ``--pool`` Fashion-MNIST train images (their labels are read by
this script only, to score pseudolabels), a seeded test sample of ``--test`` test images.

- zero-shot: the dataset's templates (no Fashion-MNIST description set exists here, so NoLA's stage 1 is the template
  classifier too).
- NoLA, DINO stand-in: ``dino_arch=vit_small_patch8_224`` (DINO ViT-S/8's architecture) with random weights saved to
  a file, read as a DINO checkpoint; top-k per class by the authors' rule (k = their ``find_k``), the alignment head
  50 epochs (theirs), the student ``--epochs`` epochs (theirs 10 with validation early stopping) with the weak ->
  strong views. The recipe model's image tower is a ResNet, which takes no prompts: ``n_prompts=0`` (the linear head
  alone trains); with ``--model`` a ViT (e.g. recipe:cifar10-vit-signal) the 16 VPT tokens train too.
- NoLA, CLIP features: the same with no DINO file (the alignment head reads CLIP's own features): what DINO adds.
- GRIP unsupervised (paper 23, textual prompts): the pool alone, no label read.
- GRIP transductive (paper 23): 5 seeded seen classes with ``--seen-per-class`` labelled train images each; the
  unlabelled data are the pool's images of the 5 unseen classes (the script picks them by their true labels: the
  protocol's definition of the unlabelled set); pseudolabels only among the unseen classes.
GRIP runs ``--grip-rounds`` rounds (step_quantile 100 // rounds; authors 10 rounds) of ``--grip-epochs`` epochs
(authors 150). Scores: test top-1 on the test sample (GRIP transductive: also seen / unseen / harmonic).

    python benchmarks/nola_fmnist.py [--quick] [--model recipe:cifar10-signal]

Writes benchmarks/results/nola_fmnist.{json,md} (or nola_fmnist_<suffix> with --suffix).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    DATA_ROOT,
    RESULTS_DIR,
    CpuAccount,
    built_model,
    header,
    load_average,
    log,
    md_table,
    model_info,
    write_results,
)

DINO_ARCH = "vit_small_patch8_224"


def load(spec: str, dataset: str = "fashion_mnist", pool_split: str = "train"):
    """(backbone, note); a recipe model must already be built (never trains here). The note ends with what the
    model has seen of ``dataset``'s pool and test sample."""
    shown = {"cifar10": "CIFAR-10"}.get(dataset, dataset)
    after = ("; it never saw Fashion-MNIST" if dataset == "fashion_mnist" else
             f"; the pool and the test sample are disjoint draws from {shown} test, images it never trained on"
             if pool_split == "test" else f"; the pool comes from {shown} train")
    return built_model(spec, held_label="CIFAR-10 val zero-shot", after=after,
                       random_note="random weights: the numbers say nothing about the method")


def random_dino(folder: Path) -> str:
    """A seeded random timm ViT (DINO ViT-S/8's architecture) saved as safetensors: the DINO stand-in."""
    import timm
    import torch
    from safetensors.torch import save_file

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model(DINO_ARCH, pretrained=False, num_classes=0)
    path = folder / "random-vit-s8.safetensors"
    save_file(model.state_dict(), str(path))
    return str(path)


def pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="recipe:cifar10-signal")
    parser.add_argument("--model-label", default=None, help="the model as the title names it")
    parser.add_argument("--note", default=None, help="what the model is (replaces the loader's note)")
    parser.add_argument("--pool", type=int, default=None, help="unlabelled train images (default 1000, quick 150)")
    parser.add_argument("--test", type=int, default=None, help="test images (default 2000, quick 200)")
    parser.add_argument("--epochs", type=int, default=None, help="NoLA student epochs (default 3, quick 1)")
    parser.add_argument("--nola-lr", type=float, default=None, help="NoLA student learning rate (authors 3e-4)")
    parser.add_argument("--grip-rounds", type=int, default=None, help="GRIP rounds (default 2, quick 1)")
    parser.add_argument("--grip-epochs", type=int, default=None, help="GRIP epochs a round (default 2, quick 1)")
    parser.add_argument("--seen-per-class", type=int, default=20)
    parser.add_argument("--methods", default="nola-dino,nola-clip,grip-unsupervised,grip-transductive")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--suffix", default=None, help="results name suffix (nola_fmnist_<suffix>)")
    parser.add_argument("--dataset", default="fashion_mnist", help="a named dataset (results: nola_<name>; "
                        "fashion_mnist writes nola_fmnist)")
    parser.add_argument("--pool-split", default="train", choices=["train", "test"],
                        help="where the unlabelled pool comes from (test: disjoint from the test sample)")
    parser.add_argument("--add", action="store_true", help="keep the results file's runs of other models")
    parser.add_argument("--render", default=None, metavar="NAME", help="rewrite results/NAME.md from its JSON")
    args = parser.parse_args()
    if args.render:
        record = json.loads((RESULTS_DIR / f"{args.render}.json").read_text())
        write_results(args.render, record, render(record))
        return
    quick = args.quick
    pool_n = args.pool or (150 if quick else 1000)
    test_n = args.test or (200 if quick else 2000)
    epochs = args.epochs or (1 if quick else 3)
    rounds = args.grip_rounds or (1 if quick else 2)
    grip_epochs = args.grip_epochs or (1 if quick else 2)

    from cliplab.data import load_dataset
    from cliplab.data.base import Subset
    from cliplab.eval.inputs import build_head, resolve_templates
    from cliplab.features.embed import embed_images

    record = header("nola_fmnist", __doc__.splitlines()[0], quick)
    backbone, note = load(args.model, args.dataset, args.pool_split)
    note = args.note or note
    label = args.model_label or args.model
    dataset = args.dataset
    title = {"fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10"}.get(dataset, dataset)
    train = load_dataset(dataset, DATA_ROOT, "train")
    test = load_dataset(dataset, DATA_ROOT, "test")
    names = list(train.class_names)
    n_classes = len(names)
    rng = np.random.default_rng(0)
    train_labels, test_labels = np.asarray(train.labels), np.asarray(test.labels)
    if args.pool_split == "train":
        pool_idx = np.sort(rng.choice(len(train_labels), pool_n, replace=False))
        test_idx = np.sort(rng.choice(len(test_labels), test_n, replace=False))
    else:  # pool and test sample: disjoint draws from the test split
        drawn = rng.choice(len(test_labels), pool_n + test_n, replace=False)
        pool_idx, test_idx = np.sort(drawn[:pool_n]), np.sort(drawn[pool_n:])
    pool_source = train if args.pool_split == "train" else test
    seen = np.sort(rng.permutation(n_classes)[:n_classes // 2])
    unseen = np.setdiff1d(np.arange(n_classes), seen)
    rest = np.setdiff1d(np.arange(len(train_labels)), pool_idx if args.pool_split == "train" else [])
    seen_idx = np.concatenate([rng.choice(rest[train_labels[rest] == c], args.seen_per_class, replace=False)
                               for c in seen])
    pool_images = Subset(pool_source, pool_idx)

    def embed(dataset, indices=None, model=backbone):
        data = dataset if indices is None else Subset(dataset, indices)
        return embed_images(model, data, args.cache_dir, progress=False)

    log(f"embedding {pool_n + len(seen_idx)} train and {test_n} test images")
    with CpuAccount() as embedding:
        pool, seen_train, test_f = embed(pool_images), embed(train, seen_idx), embed(test, test_idx)
    pool_y = pool.labels  # read by this script only, to score pseudolabels
    zeroshot = build_head("zeroshot", backbone, names, dataset_name=dataset, cache_dir=args.cache_dir).fit()
    zs_acc = float(zeroshot.score(test_f.features, test_f.labels))
    log(f"zero-shot {pct(zs_acc)}%")
    prompts_ok = True
    try:
        backbone.image_tower()
    except Exception:  # noqa: BLE001 - a ResNet tower: no prompts
        prompts_ok = False
    n_prompts = 16 if prompts_ok else 0
    record.update(model=args.model, weights=note, model_info=model_info(backbone),
                  templates=resolve_templates("nola", None, dataset), load_before=load_average(),
                  embedding=embedding.result, zero_shot_test_acc=zs_acc,
                  sizes={"pool": pool_n, "test": test_n, "seen_per_class": args.seen_per_class},
                  seen_classes=[names[c] for c in seen], unseen_classes=[names[c] for c in unseen],
                  nola_epochs=epochs, nola_prompts=n_prompts, nola_lr=args.nola_lr or 3e-4,
                  grip_rounds=rounds, grip_epochs=grip_epochs,
                  dino_stand_in=f"{DINO_ARCH}, random weights (seed 0)", dataset=dataset, pool_split=args.pool_split)
    results = {}
    scratch = Path(tempfile.mkdtemp(prefix="nola-bench-"))
    for method in args.methods.split(","):
        log(f"{method}: fitting")
        entry: dict = {}
        with CpuAccount() as cpu, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if method.startswith("nola"):
                params = dict(max_epoch=epochs, n_prompts=n_prompts, progress=False,
                              **({"lr": args.nola_lr} if args.nola_lr else {}))
                if method == "nola-dino":
                    params.update(dino_checkpoint=random_dino(scratch), dino_arch=DINO_ARCH)
                head = build_head("nola", backbone, names, dataset_name=dataset, cache_dir=args.cache_dir,
                                  params=params)
                head.fit(pool.features, np.zeros(len(pool.features), np.int64), images=pool_images)
                test_tuned = embed(test, test_idx, model=head.backbone_) if n_prompts else test_f
                entry.update(test_acc=float(head.score(test_tuned.features, test_f.labels)), k=head.k_,
                             pseudolabels=int(len(head.pseudo_rows_)),
                             pseudolabel_acc=float(np.mean(head.pseudo_labels_ == pool_y[head.pseudo_rows_])),
                             student_label_acc=float(np.mean(head.student_labels_ == pool_y)),
                             ssl_encoder=head.ssl_encoder_, final_loss=head.final_loss_)
            else:
                setting = method.split("-", 1)[1]
                head = build_head("grip", backbone, names, dataset_name=dataset, cache_dir=args.cache_dir,
                                  params=dict(setting=setting, step_quantile=100 // rounds, max_epoch=grip_epochs,
                                              warmup_epochs=1, progress=False))
                if setting == "unsupervised":
                    head.fit(pool.features, np.zeros(len(pool.features), np.int64))
                else:
                    unlabelled = pool.features[np.isin(pool_y, unseen)]
                    head.fit(seen_train.features, seen_train.labels, unlabelled=unlabelled)
                    s, u = np.isin(test_f.labels, seen), np.isin(test_f.labels, unseen)
                    a = float(head.score(test_f.features[s], test_f.labels[s]))
                    b = float(head.score(test_f.features[u], test_f.labels[u]))
                    entry.update(seen_acc=a, unseen_acc=b, harmonic=2 * a * b / (a + b) if a + b else 0.0)
                entry.update(test_acc=float(head.score(test_f.features, test_f.labels)), rounds=head.rounds_,
                             pool=head.pool_size_)
        entry["fit"] = cpu.result
        results[method] = entry
        log(f"{method}: test top-1 {pct(entry['test_acc'])}% ({cpu.result['wall_s']:.0f} s)")
    record.update(results=results, load_after=load_average(), label=label, title=title,
                  nola_lr=args.nola_lr or 3e-4)
    name = ("nola_fmnist" if dataset == "fashion_mnist" else f"nola_{dataset}") + (f"_{args.suffix}" if args.suffix
                                                                                    else "")
    runs = [as_run(record)]
    path = RESULTS_DIR / f"{name}.json"
    if args.add and path.exists():  # keep the file's runs of other models (a run of the same label is replaced)
        runs = [r for r in file_runs(json.loads(path.read_text())) if r["label"] != label] + runs
    record = {**{k: record[k] for k in HEADER_KEYS}, "runs": runs}
    write_results(name, record, render(record))


HEADER_KEYS = ("benchmark", "description", "mode", "started", "machine", "libraries", "git", "command")


def as_run(record: dict) -> dict:
    """One model's run: every field of a single-run record (the header fields kept as the run's own)."""
    run = dict(record)
    if "label" not in run:  # a file written before runs: the label was given as --model-label, else the model
        command = run.get("command", "")
        run["label"] = (command.split("--model-label ", 1)[1].split(" --", 1)[0] if "--model-label " in command
                        else run["model"])
    if "title" not in run:
        run["title"] = {"fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10"}.get(run.get("dataset"),
                                                                                    run.get("dataset"))
    return run


def file_runs(record: dict) -> list[dict]:
    """The runs a results file holds (a file from before runs is one run)."""
    return list(record["runs"]) if "runs" in record else [as_run(record)]


def render(record: dict) -> str:
    """The markdown of a results record: each run's settings, one table of every run's rows."""
    runs = file_runs(record)
    title = runs[-1]["title"]
    rows, settings = [], []
    for run in runs:
        label, sizes = run["label"], run["sizes"]
        n_prompts, pool_split = run["nola_prompts"], run.get("pool_split", "train")
        rows.append([label, "zero-shot (templates)", pct(run["zero_shot_test_acc"]), "-", "-", "-", "-"])
        for method, entry in run["results"].items():
            extra = (f"seen {pct(entry['seen_acc'])}, unseen {pct(entry['unseen_acc'])}, harmonic "
                     f"{pct(entry['harmonic'])}" if "harmonic" in entry else
                     (f"k {entry['k']}, {entry['pseudolabels']} pseudolabels {pct(entry['pseudolabel_acc'])}% "
                      f"right, alignment-head labels {pct(entry['student_label_acc'])}% right" if "k" in entry else
                      f"{len(entry['rounds'])} rounds"))
            fit = entry["fit"]
            rows.append([label, method, pct(entry["test_acc"]), f"{fit['wall_s']:.0f}", f"{fit['own_cpu_s']:.0f}",
                         f"{fit['foreign_load']:.1f}", extra])
        test_n, n_classes = sizes["test"], len(run["seen_classes"]) + len(run["unseen_classes"])
        p = max(run["zero_shot_test_acc"], 1 / n_classes)
        settings += [
            f"**{label}** ({run['started'][:16].replace('T', ' ')} UTC, git {run.get('git')}). Model: "
            f"{run['weights']}. CPU-sized, not the papers' recipes: pool {sizes['pool']} {title} {pool_split} "
            f"images (seeded; labels read by this script only), test sample {test_n} (disjoint). NoLA: templates "
            f"only (no description set), {n_prompts} prompts ("
            f"{'VPT-shallow: ViT image tower' if n_prompts else 'ResNet image tower: the linear head alone trains'}"
            f"), student {run['nola_epochs']} epochs (authors 10) at lr {run.get('nola_lr', 3e-4):g} (authors 3e-4), "
            f"alignment head 50 epochs. GRIP: textual prompts, {run['grip_rounds']} rounds (authors 10) of "
            f"{run['grip_epochs']} epochs (authors 150); transductive: seen {', '.join(run['seen_classes'])} "
            f"({sizes['seen_per_class']} labelled each), unlabelled = the pool's unseen-class images. One standard "
            f"error of a top-1 near the zero-shot score on {test_n} test images: about "
            f"{100 * (p * (1 - p) / test_n) ** 0.5:.1f} points.", ""]
    n_classes = len(runs[-1]["seen_classes"]) + len(runs[-1]["unseen_classes"])
    body = [f"# NoLA and GRIP without labels · {title} · models trained on CIFAR-10 train images", "",
            f"DINO stand-in: {DINO_ARCH} with random weights (no DINO weights here), so the alignment head of "
            "`nola-dino` reads random-ViT features; `nola-clip` uses CLIP's own features instead.", "",
            *settings,
            md_table(["model", "method", "test top-1 %", "wall s", "CPU s", "foreign load", "notes"], rows), "",
            f"Chance is {100 / n_classes:.0f}% ({n_classes} classes). Pseudolabel and alignment-head accuracies are "
            "against the true labels of the pool, which only this script reads: when they sit at chance, nothing "
            "downstream can learn the classes. The environment below is the latest run's."]
    return "\n".join(body)


if __name__ == "__main__":
    main()
