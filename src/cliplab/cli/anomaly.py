"""``cliplab anomaly``: zero-shot anomaly maps (Bayes-PFL, paper 51, or the WinCLIP-style prompt baseline)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..errors import CliplabError
from .common import RunOptions, command, console

METHOD_HELP = ("bayes-pfl (prompt flows trained on the auxiliary synthetic split, or loaded with --weights) or "
               "winclip (compositional normal/anomalous prompts, no training).")
MODE_HELP = ("Patch features: dense (patch tokens of a ViT, or a ResNet's value path), windows (window embeddings, "
             "any model, WinCLIP-style) or auto (dense where the model has a dense tower).")
EVALUATE_HELP = ("Score the seeded synthetic test split (DTD textures with cut-paste, scratch and blotch defects) "
                 "and print image AUROC, pixel AUROC and AUPRO; IMAGES may then be left out.")


@command
def anomaly(
    images: list[Path] = typer.Argument(None, help="Image files to score."),
    object_name: str = typer.Option("texture", "--object", help="What the images show, as the prompts name it."),
    method: str = typer.Option("bayes-pfl", "--method", help=METHOD_HELP),
    weights: Path = typer.Option(None, "--weights", help="A Bayes-PFL folder saved with --save (else it trains)."),
    save: Path = typer.Option(None, "--save", help="Save the trained Bayes-PFL in this folder."),
    epochs: int = typer.Option(5, "--epochs", min=1, help="Bayes-PFL training epochs on the auxiliary split."),
    aux_size: int = typer.Option(128, "--aux-size", min=16, help="Side in pixels of the auxiliary training images."),
    samples: int = typer.Option(5, "--samples", min=1, help="Bayes-PFL draws of each prompt flow at inference."),
    patch_mode: str = typer.Option("auto", "--patch-mode", help=MODE_HELP),
    size: int = typer.Option(None, "--size", min=8, help="Input side in pixels for the patch features (default: "
                             "the model's for dense, 4x it for windows)."),
    evaluate: bool = typer.Option(False, "--evaluate", help=EVALUATE_HELP),
    data_root: Path = typer.Option(None, "--data-root", help="Folder holding dtd_sample (default: $CLIPLAB_DATA or "
                                   "../shared/datasets)."),
    output: Path = typer.Option(Path("anomaly_maps"), "--output", "-o", help="Folder for the map PNGs and "
                                "scores.json."),
    run: RunOptions = None,
):
    """Anomaly score and map per image: Bayes-PFL prompt flows or WinCLIP-style prompts, maps written as PNGs."""
    from ..data.images import load_image

    if method not in ("bayes-pfl", "winclip"):
        raise CliplabError(f"--method must be bayes-pfl or winclip; got {method!r}")
    if not object_name.strip():
        raise CliplabError("--object must name what the images show, e.g. --object texture")
    if patch_mode not in ("auto", "dense", "windows"):
        raise CliplabError(f"--patch-mode must be auto, dense or windows; got {patch_mode!r}")
    if not images and not evaluate:
        raise CliplabError("give image files to score, or --evaluate for the synthetic test split")
    if weights is not None and not (Path(weights) / "bayes_pfl.json").is_file():
        raise CliplabError(f"--weights {weights}: no saved Bayes-PFL there (bayes_pfl.json missing)")
    if weights is not None and method != "bayes-pfl":
        raise CliplabError("--weights applies to --method bayes-pfl only")
    missing = [str(p) for p in images or [] if not Path(p).is_file()]
    if missing:
        raise CliplabError(f"image not found: {missing[0]}")
    pictures = [load_image(p) for p in images or []]  # decode errors before the model loads

    from ..data.anomaly import anomaly_set
    from ..regions.anomaly import PromptBaseline, patch_features, resolve_mode

    backbone = run.load_backbone()
    mode = resolve_mode(backbone, patch_mode)
    model = None
    if method == "bayes-pfl":
        from ..regions.bayes_pfl import BayesPFL, fit_bayes_pfl

        if weights is not None:
            model = BayesPFL.load(weights, backbone)
        else:
            aux = anomaly_set("aux", root=data_root, size=aux_size, seed=run.seed)
            aux_features = patch_features(backbone, aux.images(), mode=mode, size=size)
            model = fit_bayes_pfl(backbone, aux_features, aux.masks, aux.labels, object_name=object_name,
                                  epochs=epochs, seed=run.seed, progress=not run.quiet)
        model = model.with_object(object_name)
        if save is not None:
            model.save(save)
            console.print(f"saved: {save}", markup=False, highlight=False, soft_wrap=True)
    output.mkdir(parents=True, exist_ok=True)
    record = {"method": method, "model": backbone.display_name, "model_id": backbone.model_id, "object": object_name,
              "patch_mode": mode, "weights": "random" if backbone.info.random_weights else "pretrained"}

    def score(pics, out_size):
        features = patch_features(backbone, pics, mode=mode, size=size)
        if model is None:
            return PromptBaseline(backbone, object_name).score(features, out_size)
        return model.predict(features, out_size, samples=samples, seed=run.seed)

    if evaluate:
        from ..eval.anomaly import evaluate_anomaly

        test = anomaly_set("test", root=data_root, size=aux_size, seed=run.seed)
        metrics = evaluate_anomaly(backbone, test, method=method, model=model, object_name=object_name, mode=mode,
                                   size=size, samples=samples, seed=run.seed)
        record["synthetic_test"] = metrics
        console.print(f"synthetic test ({len(test)} images): image AUROC {metrics['image_auroc']:.3f}, pixel AUROC "
                      f"{metrics['pixel_auroc']:.3f}, AUPRO {metrics['aupro']:.3f}",
                      markup=False, highlight=False, soft_wrap=True)
    if pictures:
        import numpy as np
        from PIL import Image

        result = score(pictures, 224)
        rows = []
        for k, (path, picture) in enumerate(zip(images, pictures)):
            heat = (result.maps[k].clamp(0, 1).numpy() * 255).round().astype(np.uint8)
            png = output / f"{k:04d}_{Path(path).stem}_anomaly.png"
            Image.fromarray(heat).resize(picture.size, Image.BILINEAR).save(png)
            value = float(result.scores[k])
            rows.append({"image": str(path), "score": value, "map": str(png),
                         "map_max": float(result.maps[k].max())})
            console.print(f"{path}: anomaly score {value:.4f}, map {png}", markup=False, highlight=False,
                          soft_wrap=True)
        record["images"] = rows
    (output / "scores.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
