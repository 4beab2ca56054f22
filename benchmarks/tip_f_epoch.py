"""Tip-Adapter-F: seconds per training epoch from cached augmented views vs re-encoding the images each epoch.

Side by side in one run on real CIFAR-10 train images (16 shots x 10 classes = 160 images), ViT-B-32 with
RANDOM weights (speed does not depend on the weights' values). "Re-encoding" is what the authors' code does:
every epoch decodes, augments (random resized crop + flip) and encodes each training image again, then
takes the optimiser steps. "Cached" trains on the views stored once in the feature cache. Target: >= 10x.

    python benchmarks/tip_f_epoch.py [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from _common import DATA_ROOT, header, log, md_table, model_info, write_results
from cliplab.data import Subset, load_dataset
from cliplab.eval.fewshot import image_size
from cliplab.features import embed_images
from cliplab.features.views import Augmentation, AugmentedViews, stack_views
from cliplab.heads import create_head
from cliplab.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model instead of ViT-B-32")
    args = parser.parse_args()
    name = "tiny" if args.quick else "ViT-B-32"
    backbone = load_model(name, pretrained=None if args.quick else "random", device="cpu")
    train = load_dataset("cifar10", root=DATA_ROOT, split="train")
    cache = tempfile.mkdtemp(prefix="cliplab-tipf-")
    feats = embed_images(backbone, train, cache, progress=False).labelled() if args.quick else None
    if feats is None:  # ViT-B-32: embed only the shots, not all 9,000 train images
        split_rows = train.labels
        rng = np.random.default_rng(1)
        shots = np.concatenate([rng.permutation(np.flatnonzero(split_rows == c))[:16] for c in range(10)])
        subset = Subset(train, shots)
    else:
        subset = Subset(train, feats.few_shot(16, seed=1).train.indices)
    augmentation = Augmentation(size=image_size(backbone))
    plain = embed_images(backbone, subset, cache, progress=False)
    X, y = np.asarray(plain.features), plain.labels
    views = stack_views(embed_images(backbone, AugmentedViews(subset, 10, 0, augmentation), cache, progress=False), 10)
    names = list(train.class_names)
    epochs = 3

    def head(n_epochs):
        return create_head("tip-adapter-f", backbone=backbone, class_names=names, templates="cifar10",
                           cache_dir=cache, epochs=n_epochs, search_hp=False)

    head(0).fit(X, y, views=views)  # text weights cached
    start = time.perf_counter()
    head(epochs).fit(X, y, views=views)
    cached = (time.perf_counter() - start) / epochs
    log(f"cached views: {cached:.4f} s/epoch")

    reencode_times = []
    for epoch in range(2):
        start = time.perf_counter()
        fresh = AugmentedViews(subset, 1, seed=1000 + epoch, augmentation=augmentation)
        tmp = tempfile.mkdtemp(prefix="cliplab-tipf-fresh-")  # an empty cache: every image encoded again
        epoch_views = stack_views(embed_images(backbone, fresh, tmp, progress=False, num_workers=0), 1)
        head(1).fit(X, y, views=epoch_views)
        reencode_times.append(time.perf_counter() - start)
        log(f"re-encode epoch {epoch}: {reencode_times[-1]:.2f} s")
    reencode = float(np.median(reencode_times))
    ratio = reencode / cached
    record = header("tip_f_epoch", __doc__.strip().splitlines()[0], args.quick)
    record.update(model=model_info(backbone), images=len(subset), cached_s_per_epoch=cached,
                  reencode_s_per_epoch=reencode, ratio=ratio, target=10)
    body = "\n".join([
        f"# Tip-Adapter-F epoch time: cached views vs re-encoding ({name}, random weights)", "",
        md_table(["path", "s / epoch"], [["cached views (10 stored, one per epoch)", round(cached, 4)],
                                         ["re-encode every epoch (decode + augment + forward)", round(reencode, 3)]]),
        "", f"ratio **{ratio:,.0f}x** (target >= 10x); {len(subset)} training images, batch 256.", ""])
    write_results("tip_f_epoch", record, body)


if __name__ == "__main__":
    main()
