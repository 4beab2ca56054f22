"""CoOp: seconds per training epoch from cached image features vs re-encoding the images every epoch (tiny model).

Side by side in one run, on real JPEGs: the Imagenette sample's train split (224 px) and the DTD sample (its
own 300-640 px), with the ``tiny`` model (random weights; speed does not depend on their values). Both
variants train the same prompt learner with CoOp's objective and settings (``CoOp.train_settings``) through
the one loop (``cliplab.train.engine.run_training``); they differ only in where an epoch's image features
come from:

- cached: ``CoOp.epoch_data`` over the augmented views embedded once into the feature cache (that one-off
  embedding is timed separately), one stored view per item per epoch, what ``CoOp.fit`` trains on;
- re-encode: what the authors' loop does each epoch: decode every training image, draw a fresh random
  resized crop + flip (cliplab's ``Augmentation``), preprocess and run the frozen image tower, then step.

Wall seconds and this process's CPU seconds are recorded for both, with the other load on the machine
(2 shared cores). Target: the cached epoch at least 10x faster.

    python benchmarks/coop_epoch.py [--quick]
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch

from _common import DATA_ROOT, CpuAccount, header, load_average, log, md_table, model_info, write_results
from cliplab.data import load_dataset
from cliplab.eval.fewshot import image_size
from cliplab.features import embed_images
from cliplab.features.views import Augmentation, AugmentedViews, stack_views
from cliplab.heads import create_head
from cliplab.heads.coop import CoOpObjective
from cliplab.models import load_model
from cliplab.train.engine import run_training

NAME = "coop_epoch"
VIEWS = 10
TARGET = 10


def reencoding_data(backbone, dataset, labels: np.ndarray, augmentation: Augmentation, seed: int, batch: int):
    """``data(epoch)``: each batch decoded, augmented afresh (seeded by (seed, epoch)) and encoded now."""
    n = len(dataset)
    stop = n - n % batch if n >= batch else n

    def data(epoch: int):
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(n)
        for start in range(0, stop, batch):
            rows = order[start:start + batch]
            pixels = torch.stack([backbone.preprocess(augmentation(dataset.load_image(int(i)), rng)) for i in rows])
            yield {"features": backbone.encode_images(pixels), "labels": torch.from_numpy(labels[rows])}

    return data


DATASETS = (("imagenette", "train", "Imagenette sample train (224 px JPEGs)"),
            ("dtd", "test", "DTD sample (JPEGs at their own 300-640 px; the sample's only split, used here as "
                            "the training set for timing)"))


def measure(backbone, name: str, split: str, epochs: int, repeats: int, thread_counts: list[int]) -> list[dict]:
    """Embed the set and its views once, then time both variants (interleaved) through ``run_training``, with
    each torch intra-op thread count."""
    dataset = load_dataset(name, root=DATA_ROOT, split=split)
    names = list(dataset.class_names)
    cache = tempfile.mkdtemp(prefix="cliplab-coop-epoch-")
    augmentation = Augmentation(size=image_size(backbone))
    with CpuAccount() as embed_cost:
        plain = embed_images(backbone, dataset, cache, progress=False, num_workers=0)
        views = stack_views(embed_images(backbone, AugmentedViews(dataset, VIEWS, 0, augmentation), cache,
                                         progress=False, num_workers=0), VIEWS)
    X, y = np.asarray(plain.features), np.asarray(plain.labels)
    log(f"{name}: {len(y)} images; embedding them and {VIEWS} views once: {embed_cost.result['wall_s']:.2f} s")
    head = create_head("coop", backbone=backbone, class_names=names, max_epoch=epochs, random_state=1)
    with CpuAccount() as fit_cost:
        head.fit(X, y, views=views)  # the head's own fit (also a warm-up for the runs below)
    settings = head.train_settings(epochs)
    sources = {"cached": head.epoch_data(views, y),
               "reencode": reencoding_data(backbone, dataset, np.asarray(dataset.labels), augmentation, 1,
                                           head.batch_size)}
    default_threads = torch.get_num_threads()
    out = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        runs = {key: [] for key in sources}
        for repeat in range(repeats):  # interleaved, so both see the same machine state
            for key, data in sources.items():
                learner = head.build_learner()
                with CpuAccount() as cost:
                    run_training(learner, CoOpObjective(), data, settings)
                runs[key].append(cost.result)
                log(f"{name} {threads} thread(s) {key:8s} {repeat}: {cost.result['wall_s'] / epochs:.3f} s/epoch "
                    f"wall, {cost.result['own_cpu_s'] / epochs:.3f} CPU, other load {cost.result['foreign_load']:.2f}")
        summary = {key: {"wall_s_per_epoch": float(np.median([r["wall_s"] for r in rs])) / epochs,
                         "cpu_s_per_epoch": float(np.median([r["own_cpu_s"] for r in rs])) / epochs,
                         "foreign_load": float(np.median([r["foreign_load"] for r in rs])), "runs": rs}
                   for key, rs in runs.items()}
        out.append({"dataset": name, "split": split, "images": len(y), "classes": len(names), "torch_threads": threads,
                    "steps_per_epoch": len(sources["cached"](0)), "text_positions": head.text_positions_,
                    "one_off_embedding": embed_cost.result, "cached_fit": fit_cost.result, "summary": summary,
                    "ratio_wall": summary["reencode"]["wall_s_per_epoch"] / summary["cached"]["wall_s_per_epoch"],
                    "ratio_cpu": summary["reencode"]["cpu_s_per_epoch"] / summary["cached"]["cpu_s_per_epoch"]})
    torch.set_num_threads(default_threads)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and repeats")
    args = parser.parse_args()
    epochs, repeats = (2, 1) if args.quick else (5, 3)
    backbone = load_model("tiny", device="cpu")
    thread_counts = sorted({torch.get_num_threads(), 1}, reverse=True)
    results = [row for name, split, _ in DATASETS for row in measure(backbone, name, split, epochs, repeats,
                                                                     thread_counts)]
    record = header(NAME, __doc__.strip().splitlines()[0], args.quick)
    record.update(model=model_info(backbone), epochs_per_run=epochs, repeats=repeats, batch_size=32, views=VIEWS,
                  results=results, target=TARGET, load_average_end=load_average())
    labels = {name: label for name, _, label in DATASETS}
    rows = []
    for result in results:
        for key, path in (("cached", "cached features"), ("reencode", "re-encode every epoch")):
            cell = result["summary"][key]
            rows.append([labels[result["dataset"]] if key == "cached" else "",
                         f"{result['images']} x {result['classes']}", result["torch_threads"], path,
                         cell["wall_s_per_epoch"], cell["cpu_s_per_epoch"], cell["foreign_load"],
                         f"{result['ratio_wall']:.1f}x / {result['ratio_cpu']:.1f}x" if key == "reencode" else ""])
    body = "\n".join([
        "# CoOp epoch time: cached image features vs re-encoding (tiny model, random weights)", "",
        f"Batch 32, {epochs} epochs per run, median of {repeats} interleaved runs per variant; both variants train "
        "the same prompt learner with CoOp's objective and settings through `run_training`; the cached one draws "
        f"one of {VIEWS} stored views per item per epoch, the other decodes, augments and encodes every image "
        "every epoch, as the authors' loop. Text tower run on the first "
        f"{results[0]['text_positions']} of 77 positions (causal mask, see `heads/coop.py`).", "",
        md_table(["training set", "images x classes", "torch threads", "path", "wall s / epoch", "CPU s / epoch",
                  "other load (cores)", "ratio wall / CPU"], rows), "",
        f"Target: the cached epoch >= {TARGET}x faster. One-off cost of the cached path (embedding the images and "
        f"{VIEWS} views into the cache): " + ", ".join(
            f"{r['dataset']} {r['one_off_embedding']['wall_s']:.1f} s wall" for r in results[::len(thread_counts)])
        + ". Torch's default thread count and 1 thread: on this shared 2-core machine extra threads spin when the "
          "cores are busy, which inflates both variants' CPU seconds.", ""])
    write_results(NAME, record, body)


if __name__ == "__main__":
    main()
