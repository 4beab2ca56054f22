"""``cliplab segment`` (per-pixel labels for your images and class names) and ``cliplab segment-eval`` (mIoU)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..errors import CliplabError
from .common import DataOptions, RunOptions, command, console, param_value


def _methods() -> str:
    from ..dense.registry import dense_method_names

    return ", ".join(dense_method_names())


def _params(values: list[str] | None) -> dict:
    params = {}
    for text in values or []:
        if "=" not in text:
            raise CliplabError(f"--param {text!r}: expected key=value")
        key, value = text.split("=", 1)
        params[key.strip()] = param_value(value)
    return params


METHOD_HELP = "Segmentation method: " + "{methods}" + "."
THRESHOLD_HELP = ("Pixels whose best class probability is below this become background (a dataset's background "
                  "class, else a 'background' label); without it 'background' is scored as a class name like any "
                  "other where the labels include it.")
SHORT_HELP = "Resize images so the shorter side has this many pixels (aspect kept; default: the model's input size "
STRIDE_HELP = "Sliding-window step in pixels, a multiple of the patch (default: half the model's window)."
GUIDANCE_HELP = ("Weights file of a timm ViT (e.g. DINO ViT-S/16 as .safetensors or a state dict) whose last-block "
                 "keys guide correlation pooling (dinoiser --param guidance=encoder; set by this option).")


def _guidance(path: Path | None, arch: str, params: dict):
    """The guidance encoder of --guidance (None without it); tells dinoiser to use it."""
    if path is None:
        return None
    from ..dense.guidance import timm_guidance

    params.setdefault("guidance", "encoder")
    return timm_guidance(path, arch=arch)


COLLECTION_HELP = ("reco: the unlabelled images to retrieve each class's top-k from (a folder of images, or a "
                   "search index folder built by cliplab index build with the same model).")
SYNONYMS_HELP = ("GKC's synonym classifier for any method: a JSON file {class: [synonyms]}; each class scores the "
                 "mean of its names' cosines (one name per class = the plain classifier).")
SYNONYMS_LLM_HELP = ("Ask this language model for each class's synonyms (GKC) where --synonyms is not given: "
                     "replay:FILE, http://HOST:PORT/v1, openai:MODEL or hf:PATH.")


def _collection(path: Path | None, params: dict) -> None:
    """--collection: checked before the model loads, passed to the method as its ``collection`` parameter."""
    if path is None:
        return
    if not path.exists():
        raise CliplabError(f"collection not found: {path}")
    params["collection"] = str(path)


def _synonyms(path: Path | None, llm: str | None, names: list[str]) -> dict | None:
    """{class: [synonyms]} of --synonyms (or --synonyms-llm), or None; LLM failures are printed, not fatal."""
    if path is None and llm is None:
        return None
    from ..dense.gkc import load_synonyms

    synonyms, failures = load_synonyms(names, path, llm)
    for name, reason in failures.items():
        console.print(f"synonyms of {name!r}: {reason} (only its own name is used)", markup=False, highlight=False,
                      soft_wrap=True)
    return synonyms


@command
def segment(
    images: list[Path] = typer.Argument(..., help="Image files."),
    labels: str = typer.Option(None, "--labels", "-l", help='Comma-separated class names, e.g. "cat,dog,grass".'),
    labels_file: Path = typer.Option(None, "--labels-file", help="Class names, one per line (or JSON list)."),
    method: str = typer.Option("maskclip", "--method", help=METHOD_HELP.format(methods=_methods())),
    param: list[str] = typer.Option(None, "--param", help="Method parameter key=value (repeatable)."),
    templates: str = typer.Option("imagenet7", "--templates", "-t", help="Template set name or file."),
    background_threshold: float = typer.Option(None, "--background-threshold", min=0.0, max=1.0,
                                               help=THRESHOLD_HELP),
    short_side: int = typer.Option(None, "--short-side", min=1, help=SHORT_HELP + "for cliplab segment)."),
    stride: int = typer.Option(None, "--stride", min=1, help=STRIDE_HELP),
    guidance: Path = typer.Option(None, "--guidance", help=GUIDANCE_HELP),
    guidance_arch: str = typer.Option("vit_small_patch16_224", "--guidance-arch", help="timm architecture of "
                                      "--guidance (vit_small_patch16_224: DINO ViT-S/16; vit_base_patch16_224)."),
    collection: Path = typer.Option(None, "--collection", help=COLLECTION_HELP),
    synonyms: Path = typer.Option(None, "--synonyms", help=SYNONYMS_HELP),
    synonyms_llm: str = typer.Option(None, "--synonyms-llm", help=SYNONYMS_LLM_HELP),
    output_dir: Path = typer.Option(Path("segmentations"), "--output-dir", "-o", help="Where the PNGs and JSON go."),
    run: RunOptions = None,
):
    """Segment images into your class names: label PNGs, colour overlays with a legend, JSON of per-class areas."""
    from ..data import parse_labels, read_class_names
    from ..data.images import load_image

    if (labels is None) == (labels_file is None):
        raise CliplabError("give the class names with exactly one of --labels or --labels-file")
    names = parse_labels(labels) if labels is not None else read_class_names(labels_file)
    params = _params(param)
    from ..dense.registry import dense_entry

    dense_entry(method)  # a misspelled method is answered before the model loads
    missing = [str(p) for p in images if not Path(p).is_file()]
    if missing:
        raise CliplabError(f"image not found: {missing[0]}")
    _collection(collection, params)
    classes = _synonyms(synonyms, synonyms_llm, names)
    from ..dense.inference import Segmenter, SegmentSettings

    settings = SegmentSettings(short_side=short_side, stride=stride, background_threshold=background_threshold)
    encoder = _guidance(guidance, guidance_arch, params)
    backbone = run.load_backbone()
    segmenter = Segmenter(backbone, method, names, templates=templates, params=params, settings=settings,
                          guidance=encoder, cache_dir=run.cache_dir, synonyms=classes)
    output_dir.mkdir(parents=True, exist_ok=True)
    stems: list[str] = []
    for path in images:
        image = load_image(path)
        result = segmenter.segment(image)
        stem = Path(path).stem
        if stem in stems:
            from ..fileio import digest

            stem = f"{stem}-{digest(str(path))[:8]}"
        stems.append(stem)
        files = write_segmentation(image, result, output_dir, stem)
        total = result.labels.size
        record = {"image": str(path), "method": method, "params": segmenter.method.get_params(),
                  "model": backbone.display_name, "model_id": backbone.model_id,
                  "weights": "random" if backbone.info.random_weights else "pretrained",
                  "size": [int(result.labels.shape[1]), int(result.labels.shape[0])],
                  "input_size": list(result.input_size), "windows": result.windows,
                  "background_threshold": background_threshold, "class_names": result.class_names,
                  "synonyms": {k: v for k, v in classes.items() if v} if classes else None,
                  "areas": {name: {"pixels": px, "fraction": px / total} for name, px in result.areas.items()},
                  "files": {k: str(v) for k, v in files.items()}}
        json_path = output_dir / f"{stem}.json"
        json_path.write_text(json.dumps(record, indent=2, ensure_ascii=False), encoding="utf-8")
        shares = sorted(((px / total, name) for name, px in result.areas.items() if px), reverse=True)
        console.print(f"{path}: " + ", ".join(f"{name} {share:.1%}" for share, name in shares[:5]),
                      markup=False, highlight=False, soft_wrap=True)
        console.print(f"  labels: {files['labels']}  overlay: {files['overlay']}  json: {json_path}",
                      markup=False, highlight=False, soft_wrap=True)


def write_segmentation(image, result, output_dir: Path, stem: str) -> dict[str, Path]:
    """``<stem>_labels.png`` (palette PNG: pixel value = class index) and ``<stem>_overlay.png`` (the image blended
    with the class colours, a legend of the classes present on the right)."""
    import numpy as np
    from PIL import Image, ImageDraw

    from ..eval.segmentation import colourise, palette

    names = result.class_names
    labels_path = output_dir / f"{stem}_labels.png"
    indexed = Image.fromarray(result.labels.astype(np.uint8), mode="P") if len(names) <= 256 else None
    if indexed is None:
        raise CliplabError(f"{len(names)} classes do not fit a palette PNG (256 at most)")
    colours = palette(len(names))
    indexed.putpalette(colours.ravel().tolist() + [0, 0, 0] * (256 - len(names)))
    indexed.save(labels_path)
    colour = colourise(result.labels, len(names))
    blended = (0.5 * np.asarray(image.convert("RGB"), dtype=np.float32) + 0.5 * colour).astype(np.uint8)
    present = [i for i, name in enumerate(names) if result.areas.get(name)]
    row, width = 18, 12 + 10 * max([len(names[i]) for i in present] + [4]) + 24
    canvas = Image.new("RGB", (blended.shape[1] + width, max(blended.shape[0], row * len(present) + 8)), "white")
    canvas.paste(Image.fromarray(blended), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, i in enumerate(present):
        x, y = blended.shape[1] + 8, 4 + row * k
        draw.rectangle([x, y, x + 12, y + 12], fill=tuple(int(c) for c in colours[i]), outline="black")
        draw.text((x + 18, y), names[i], fill="black")
    overlay_path = output_dir / f"{stem}_overlay.png"
    canvas.save(overlay_path)
    return {"labels": labels_path, "overlay": overlay_path}


@command
def segment_eval(
    dataset: str = typer.Option(..., "--dataset", "-d", help="Segmentation set: coco_mini_seg or mosaic."),
    method: str = typer.Option("maskclip", "--method", help=METHOD_HELP.format(methods=_methods())),
    param: list[str] = typer.Option(None, "--param", help="Method parameter key=value (repeatable)."),
    templates: str = typer.Option(None, "--templates", "-t", help="Template set name or file (default: cifar10 "
                                  "for mosaic, imagenet (80 templates, as MaskCLIP) otherwise)."),
    background_threshold: float = typer.Option(None, "--background-threshold", min=0.0, max=1.0,
                                               help=THRESHOLD_HELP),
    short_side: int = typer.Option(None, "--short-side", min=1, help=SHORT_HELP + "448 for coco_mini_seg as "
                                   "CLIP-DINOiser's COCO, each image's own size for mosaic)."),
    stride: int = typer.Option(None, "--stride", min=1, help=STRIDE_HELP),
    guidance: Path = typer.Option(None, "--guidance", help=GUIDANCE_HELP),
    guidance_arch: str = typer.Option("vit_small_patch16_224", "--guidance-arch", help="timm architecture of "
                                      "--guidance (vit_small_patch16_224: DINO ViT-S/16; vit_base_patch16_224)."),
    collection: Path = typer.Option(None, "--collection", help=COLLECTION_HELP),
    synonyms: Path = typer.Option(None, "--synonyms", help=SYNONYMS_HELP),
    synonyms_llm: str = typer.Option(None, "--synonyms-llm", help=SYNONYMS_LLM_HELP),
    limit: int = typer.Option(None, "--limit", min=1, help="Evaluate only the first N images."),
    mosaic_count: int = typer.Option(200, "--mosaic-count", min=1, help="mosaic: images in the set."),
    mosaic_k: int = typer.Option(2, "--mosaic-k", min=1, help="mosaic: k x k tiles per image."),
    mosaic_seed: int = typer.Option(0, "--mosaic-seed", help="mosaic: the seed of the draw."),
    grid: int = typer.Option(4, "--grid", min=0, help="Rows of image / truth / prediction in the PNG grid."),
    output_dir: Path = typer.Option(Path("results"), "--output-dir", "-o", help="Where the JSON and PNG go."),
    run: RunOptions = None,
    data: DataOptions = None,
):
    """Segmentation benchmark: mIoU, pixel accuracy and per-class IoU of a method on a labelled set; JSON + PNG."""
    from rich.table import Table

    from ..data.segmentation import MosaicSpec, load_segmentation
    from ..dense.registry import dense_entry

    params = _params(param)
    dense_entry(method)
    _collection(collection, params)
    sets = load_segmentation(dataset, data.data_root, data.split,
                             mosaic=MosaicSpec(count=mosaic_count, k=mosaic_k, seed=mosaic_seed))
    from ..dense.inference import SegmentSettings
    from ..eval.segmentation import evaluate_segmentation

    settings = SegmentSettings(short_side=short_side, stride=stride, background_threshold=background_threshold)
    encoder = _guidance(guidance, guidance_arch, params)
    classes = _synonyms(synonyms, synonyms_llm, sets.class_names)
    backbone = run.load_backbone()
    result = evaluate_segmentation(backbone, sets, method, params=params, settings=settings, templates=templates,
                                   limit=limit, output_dir=output_dir, grid_items=grid, cache_dir=run.cache_dir,
                                   progress=not run.quiet, guidance=encoder, synonyms=classes)
    record = result.record
    weights = " · random weights" if record["weights"] == "random" else ""
    shown = method + (" + synonyms" if classes else "")
    table = Table(title=f"{shown} · {sets.name} {sets.split} ({record['items']} images) · "
                        f"{backbone.display_name}{weights}")
    table.add_column("class", overflow="fold")
    table.add_column("IoU", justify="right")
    table.add_column("Acc", justify="right")
    table.add_column("truth px", justify="right")
    for name, row in record["per_class"].items():
        if row["truth_pixels"] or row["pred_pixels"]:
            table.add_row(name, _pct(row["IoU"]), _pct(row["Acc"]), f"{row['truth_pixels']:,}")
    console.print(table)
    console.print(f"mIoU {_pct(record['mIoU'])}  mAcc {_pct(record['mAcc'])}  pixel accuracy {_pct(record['aAcc'])}  "
                  f"{record['timing']['s_per_image']:.3f} s/image", markup=False, highlight=False)
    console.print(f"json: {result.json_path}" + (f"\npng: {result.grid_path}" if result.grid_path else ""),
                  markup=False, highlight=False, soft_wrap=True)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"
