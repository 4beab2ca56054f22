"""Guidance encoders for correlation pooling (CLIP-DINOiser): a timm DINO ViT read from a local weights file.

``timm_guidance(path, arch=...)`` builds the timm architecture with random weights, loads the file (safetensors, or
a torch state dict read with ``weights_only=True``; a ``{"state_dict"|"model"|"teacher": ...}`` wrapper and
``module.``/``backbone.`` prefixes are unwrapped, DINO's released checkpoints are plain state dicts), and returns a
callable: CLIP-normalised windows (n, 3, H, W) -> (n, C, H/p, W/p) features of the last block, as the authors' hook
on DINO's last ``attn.qkv`` (``features="k"``, their DinoCLIP default; ``"q"``, ``"v"``; heads concatenated). The
windows are mapped from CLIP's to ImageNet's normalisation first (DINO's).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CliplabError, ModelLoadError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PREFIXES = ("module.", "backbone.")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a torch state dict (``weights_only=True``), wrappers and prefixes removed."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"guidance weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        from ..models.checkpoints import load_error_line

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - one line naming the file and the refusal
            raise ModelLoadError(f"{path}: {load_error_line(exc)}") from exc
    for key in ("state_dict", "model", "teacher"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    out = {}
    for name, value in state.items():
        for prefix in PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
        out[name] = value
    return out


class TimmGuidance:
    """A timm ViT's last-block q/k/v patch features for CLIP-normalised windows (module docstring)."""

    def __init__(self, model, clip_mean, clip_std, features: str = "k"):
        if features not in ("q", "k", "v"):
            raise CliplabError(f"guidance features must be q, k or v; got {features!r}")
        self.model, self.features = model.eval(), features
        self.patch = int(model.patch_embed.patch_size[0])
        shift = torch.tensor(clip_mean).view(1, 3, 1, 1), torch.tensor(clip_std).view(1, 3, 1, 1)
        self._clip = shift
        self._imagenet = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self._qkv = None
        model.blocks[-1].attn.qkv.register_forward_hook(lambda module, args, out: setattr(self, "_qkv", out))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        (cm, cs), (im, istd) = self._clip, self._imagenet
        x = ((images * cs.to(images) + cm.to(images)) - im.to(images)) / istd.to(images)
        n, _, height, width = x.shape
        self.model.forward_features(x)
        qkv = self._qkv  # (n, tokens, 3 * C)
        width_c = qkv.shape[-1] // 3
        index = "qkv".index(self.features)
        feats = qkv[..., index * width_c:(index + 1) * width_c]
        h, w = height // self.patch, width // self.patch
        feats = feats[:, -h * w:]  # patch tokens (after the class and any register tokens)
        return feats.transpose(1, 2).reshape(n, width_c, h, w).float()


def timm_guidance(path: str | Path, arch: str = "vit_small_patch16_224", features: str = "k",
                  clip_mean=(0.48145466, 0.4578275, 0.40821073), clip_std=(0.26862954, 0.26130258, 0.27577711)
                  ) -> TimmGuidance:
    """A :class:`TimmGuidance` of timm architecture ``arch`` with the weights at ``path`` (module docstring)."""
    import timm

    try:
        model = timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True)
    except Exception as exc:  # noqa: BLE001 - an unknown architecture is one line
        raise ModelLoadError(f"timm cannot build {arch!r}: {exc}") from exc
    state = read_state_dict(Path(path))
    try:
        missing, _ = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that do not fit the architecture
        raise ModelLoadError(f"{path}: not a {arch} state dict ({str(exc).splitlines()[-1].strip()})") from exc
    missing = [k for k in missing if not k.startswith("head")]
    if missing:
        raise ModelLoadError(f"{path}: not a {arch} state dict ({len(missing)} weights missing, e.g. {missing[0]})")
    return TimmGuidance(model, clip_mean, clip_std, features)
