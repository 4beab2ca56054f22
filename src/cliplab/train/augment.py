"""Batch augmentation on uint8 image tensors: random resized crop and horizontal flip, seeded per step."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_resized_crop(images: torch.Tensor, generator: torch.Generator, scale: float = 0.5,
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True) -> torch.Tensor:
    """Crop a random box of area in [scale, 1] and aspect in ``ratio`` from each image, resized back.

    One affine ``grid_sample`` for the whole batch (bilinear), the same distribution as torchvision's
    ``RandomResizedCrop`` without its retry loop (boxes are clipped to the image instead). ``images`` is
    float (n, 3, S, S); all randomness comes from ``generator``, so a step repeats exactly.
    """
    n = images.shape[0]
    area = torch.empty(n).uniform_(scale, 1.0, generator=generator)
    log_ratio = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = log_ratio.exp()
    width = (area * aspect).sqrt().clamp(max=1.0)
    height = (area / aspect).sqrt().clamp(max=1.0)
    cx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - width)
    cy = (torch.rand(n, generator=generator) * 2 - 1) * (1 - height)
    mirror = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if flip else torch.ones(n)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = width * mirror
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = height
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta.to(images.device), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def to_model_input(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (n, S, S, 3) -> normalised float (n, 3, S, S)."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
