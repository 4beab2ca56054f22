"""``cliplab dinoiser-train``: fit CLIP-DINOiser's light convs on unlabelled images: the 3x3 conv to mimic a DINO's
correlations (``--guidance``) and, with ``--background``, the 1x1 background conv to FOUND's foreground (on the
``--guidance`` ViT, else CLIP's own last block); ``cliplab segment --method dinoiser --param conv=FILE`` then needs
no DINO checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import CliplabError
from .common import RunOptions, command, console


@command
def dinoiser_train(
    images: list[Path] = typer.Argument(..., help="Unlabelled image files (the model's centre crop of each)."),
    guidance: Path = typer.Option(None, "--guidance", help="Weights of the self-supervised encoder to mimic (a timm "
                                  "DINO ViT: safetensors or a torch state dict, read without running code); needed "
                                  "for the correlation conv, and FOUND's ViT for --background when given."),
    guidance_arch: str = typer.Option("vit_small_patch16_224", "--guidance-arch", help="timm architecture of "
                                      "--guidance."),
    output: Path = typer.Option(..., "--output", "-o", help="Where the convs go (a .safetensors file; its .json "
                                "beside it)."),
    background: bool = typer.Option(False, "--background", help="Also train the 1x1 background conv against "
                                    "FOUND's unsupervised foreground (FOUND on --guidance, else on the CLIP model's "
                                    "own last block: a stand-in); without --guidance only this conv is trained."),
    found_threshold: float = typer.Option(0.3, "--found-threshold", help="FOUND: patches whose key cosine to the "
                                          "least-attended patch is above this are background."),
    steps: int = typer.Option(200, "--steps", min=1, help="Optimiser steps (each conv)."),
    batch: int = typer.Option(16, "--batch", min=1, help="Images per step."),
    lr: float = typer.Option(1e-3, "--lr", min=0.0, help="AdamW learning rate of the correlation conv (cosine "
                             "schedule)."),
    background_lr: float = typer.Option(1e-2, "--background-lr", min=0.0, help="AdamW learning rate of the "
                                        "background conv (constant, the authors' found_lr)."),
    layer: int = typer.Option(-3, "--layer", help="CLIP block whose ln_2 output the convs read (the authors': -3)."),
    run: RunOptions = None,
):
    """Train CLIP-DINOiser's light convs on your unlabelled images (for segment --method dinoiser --param conv=FILE)."""
    missing = [str(p) for p in images if not Path(p).is_file()]
    if missing:
        raise CliplabError(f"image not found: {missing[0]}")
    if guidance is None and not background:
        raise CliplabError("give --guidance (a DINO to mimic) and/or --background (FOUND's background conv)")
    from ..dense.dinoiser_train import save_guidance_conv, train_background_conv, train_guidance_conv
    from ..dense.guidance import timm_guidance

    encoder = timm_guidance(guidance, arch=guidance_arch) if guidance is not None else None
    backbone = run.load_backbone()
    files = [str(p) for p in images]
    conv = bkg = None
    if encoder is not None:
        conv = train_guidance_conv(backbone, encoder, files, layer=layer, steps=steps, lr=lr, batch_size=batch,
                                   seed=run.seed, progress=not run.quiet)
    if background:
        bkg = train_background_conv(backbone, files, guidance=encoder, found_threshold=found_threshold, layer=layer,
                                    steps=steps, lr=background_lr, batch_size=batch, seed=run.seed,
                                    progress=not run.quiet)
    path = save_guidance_conv(conv, output, backbone, layer, background=bkg)
    console.print(f"saved: {path}  (use: cliplab segment --method dinoiser --param conv={path})", markup=False,
                  highlight=False, soft_wrap=True)
