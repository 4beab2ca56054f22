"""``cliplab count``: count objects in images by blockwise classification (CLIP-EBC, paper 49): a total per image
and a density-map PNG; ``--train DIR`` trains a counter on the synthetic counting scenes first."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..errors import CliplabError
from .common import RunOptions, command, console, err_console

BLOCKS_HELP = ("Block embeddings: tiles (each block cropped and embedded at the model's input size; any tower) or "
               "patches (a ViT's patch tokens averaged per block).")
TRAIN_HELP = ("Train a counter on --scenes synthetic counting scenes (CIFAR-10 objects on DTD textures, train "
              "split) and save it in this folder; then count IMAGES with it, if any.")


@command
def count(
    images: list[Path] = typer.Argument(None, help="Image files."),
    counter_dir: Path = typer.Option(None, "--counter", help="A counter saved by --train (default: untrained "
                                     "zero-shot blockwise classification with the count prompts)."),
    train_dir: Path = typer.Option(None, "--train", help=TRAIN_HELP),
    scenes: int = typer.Option(300, "--scenes", min=1, help="Training scenes (with --train)."),
    epochs: int = typer.Option(20, "--epochs", min=1, help="Training epochs (with --train)."),
    lr: float = typer.Option(1e-2, "--lr", min=0.0, help="Learning rate (with --train)."),
    block: int = typer.Option(32, "--block", min=1, help="Block side in pixels; images are resized to whole blocks."),
    blocks: str = typer.Option("tiles", "--blocks", help=BLOCKS_HELP),
    vpt: int = typer.Option(0, "--vpt", min=0, help="Visual prompt tokens per tower block (ViT towers; with --train)."),
    shallow_vpt: bool = typer.Option(False, "--shallow-vpt", help="Prompt tokens before the first block only."),
    noun: str = typer.Option("object", "--noun", help='What is counted, in the prompts ("There are two objects.").'),
    truncation: int = typer.Option(4, "--truncation", min=1, help="Bins 0, 1, ..., T-1 and 'more than T'."),
    count_loss: str = typer.Option("dmcount", "--count-loss", help="dmcount, mae or mse (with --train)."),
    output_dir: Path = typer.Option(Path("counts"), "--output-dir", "-o", help="Where the density PNGs and "
                                    "counts.json go."),
    data_root: Path = typer.Option(None, "--data-root", help="Folder holding cifar10/ and dtd_sample/ (with "
                                   "--train; default: $CLIPLAB_DATA, else ../shared/datasets)."),
    run: RunOptions = None,
):
    """Count objects per image by blockwise classification (CLIP-EBC): total count and a density-map PNG."""
    from ..data.images import load_image

    images = list(images or [])
    if not images and train_dir is None:
        raise CliplabError("no images to count: give image files (or --train DIR to train a counter)")
    if counter_dir is not None and train_dir is not None:
        raise CliplabError("give --counter (a trained counter) or --train (train one), not both")
    if counter_dir is not None and not (Path(counter_dir) / "counter.json").is_file():
        raise CliplabError(f"{counter_dir}: not a saved counter (no counter.json); train one with --train DIR")
    missing = [str(p) for p in images if not Path(p).is_file()]
    if missing:
        raise CliplabError(f"image not found: {missing[0]}")
    loaded = [load_image(p) for p in images]  # unreadable images fail before the model loads

    from ..regions.counting import (
        CounterConfig,
        EBCCounter,
        count_images,
        density_image,
        fit_counter,
        load_counter,
        save_counter,
    )

    config = CounterConfig(block=block, blocks=blocks, truncation=truncation, noun=noun,
                           anchors="average" if train_dir is not None else "middle", num_vpt=vpt,
                           deep_vpt=not shallow_vpt, count_loss=count_loss)
    backbone = run.load_backbone()
    if counter_dir is not None:
        counter = load_counter(counter_dir, backbone)
    elif train_dir is not None:
        EBCCounter(backbone, config)  # an unsupported tower fails here, in one line, before any scene is drawn
        from ..data.counting import CountingSpec, load_counting_scenes
        from ..train.engine import TrainSettings

        train = load_counting_scenes(data_root, "train", CountingSpec(count=scenes, seed=run.seed))
        settings = TrainSettings(epochs=epochs, lr=lr, weight_decay=1e-4, seed=run.seed, device=run.device,
                                 progress=not run.quiet, desc="clip-ebc")
        counter, result = fit_counter(backbone, train, config, settings)
        save_counter(counter, train_dir)
        console.print(f"counter: {train_dir} ({scenes} scenes, {epochs} epochs, last loss {result.last_loss:.3f})",
                      markup=False, highlight=False, soft_wrap=True)
    else:
        counter = EBCCounter(backbone, config)
        err_console.print("note: untrained counter (zero-shot blockwise classification); train one with --train",
                          markup=False, highlight=False, soft_wrap=True)
    if not images:
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    records, used = [], set()
    for path, image, found in zip(images, loaded, count_images(counter, loaded)):
        stem = Path(path).stem
        name = stem if stem not in used else f"{stem}_{len(used)}"
        used.add(name)
        png = output_dir / f"{name}_density.png"
        density_image(found, image).save(png)
        h, w = found.density.shape
        nouns = counter.config.plural or counter.config.noun + "s"
        console.print(f"{path}: {found.total:.1f} {nouns} ({h}x{w} blocks of {found.block} px) -> {png}",
                      markup=False, highlight=False, soft_wrap=True)
        records.append({"image": str(path), "density_png": str(png), **found.record()})
    summary = {"model": backbone.display_name, "model_id": backbone.model_id,
               "counter": str(counter_dir or train_dir or "zero-shot"), "config": counter.config.__dict__,
               "anchors": counter.anchors.tolist(), "prompts": counter.config.prompts(), "images": records}
    (output_dir / "counts.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
