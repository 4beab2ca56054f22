"""``cliplab dinoiser-train``: fit CLIP-DINOiser's 3x3 conv on unlabelled images to mimic a DINO's correlations;
``cliplab segment --method dinoiser --param conv=FILE`` then needs no DINO checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import CliplabError
from .common import RunOptions, command, console


@command
def dinoiser_train(
    images: list[Path] = typer.Argument(..., help="Unlabelled image files (the model's centre crop of each)."),
    guidance: Path = typer.Option(..., "--guidance", help="Weights of the self-supervised encoder to mimic (a timm "
                                  "DINO ViT: safetensors or a torch state dict, read without running code)."),
    guidance_arch: str = typer.Option("vit_small_patch16_224", "--guidance-arch", help="timm architecture of "
                                      "--guidance."),
    output: Path = typer.Option(..., "--output", "-o", help="Where the conv goes (a .safetensors file; its .json "
                                "beside it)."),
    steps: int = typer.Option(200, "--steps", min=1, help="Optimiser steps."),
    batch: int = typer.Option(16, "--batch", min=1, help="Images per step."),
    lr: float = typer.Option(1e-3, "--lr", min=0.0, help="AdamW learning rate (cosine schedule)."),
    layer: int = typer.Option(-3, "--layer", help="CLIP block whose ln_2 output the conv reads (the authors': -3)."),
    run: RunOptions = None,
):
    """Train CLIP-DINOiser's light conv on your unlabelled images (for segment --method dinoiser --param conv=FILE)."""
    missing = [str(p) for p in images if not Path(p).is_file()]
    if missing:
        raise CliplabError(f"image not found: {missing[0]}")
    from ..dense.dinoiser_train import save_guidance_conv, train_guidance_conv
    from ..dense.guidance import timm_guidance

    encoder = timm_guidance(guidance, arch=guidance_arch)
    backbone = run.load_backbone()
    conv = train_guidance_conv(backbone, encoder, [str(p) for p in images], layer=layer, steps=steps, lr=lr,
                               batch_size=batch, seed=run.seed, progress=not run.quiet)
    path = save_guidance_conv(conv, output, backbone, layer)
    console.print(f"saved: {path}  (use: cliplab segment --method dinoiser --param conv={path})", markup=False,
                  highlight=False, soft_wrap=True)
