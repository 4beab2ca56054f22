"""Dense (patch) features of image towers: patch tokens with their grid, projected into the joint space.

Three ways through the tower (:class:`DenseSpec` ``path`` and ``layer``):

- ``final``: the residual stream after block ``layer`` (default the last), then the final norm (``ln_post`` /
  ``post_layernorm``) and the image projection, as ``Backbone.dense_features`` gives for the last block;
- ``value``: MaskCLIP's value path of block ``layer`` (Zhou et al., ECCV 2022; the authors' ``vit.py`` and
  GL-MCM's ``clip/model.py``): the block's value embedding ``W_v ln_1(x) + b_v`` passed through the attention's
  output projection, skipping the query-key attention (every token attends only to itself), plus the residual
  and the block's MLP, ``v = x + out_proj(v); v = v + mlp(ln_2(v))``; then the final norm and the projection.
  Blocks after ``layer`` are not run. ``value_mlp=False`` keeps ``out_proj(v)`` alone (no residual, no MLP, as
  ClearCLIP drops both; ClearCLIP's query-query attention is not reproduced).

Three inputs (``input``): ``model``, the backbone's own evaluation transform (centre crop at the model's
resolution); ``aspect``, the whole image resized so its shorter side is ``resolution`` pixels (default: the
model's), both sides rounded to whole patches, the longer one capped at ``max_side``; ``sliding``, the same
resize, then windows of the model's size every ``stride`` pixels, each run at the model's grid, and every patch
the renormalised mean of its L2-normalised tokens over the windows covering it (the mean of cosine logits, as
sliding-window inference averages window logits). Where the patch grid differs from the model's, the patch
positional embeddings are resampled bicubically (``align_corners=False``, as MaskCLIP and transformers do);
the class-token position is kept as is.

ResNet towers (open_clip ``ModifiedResNet``, :class:`OpenClipResNetTower`): MaskCLIP's RN value path (the
authors' ``maskclip_head.py``, ``vit=False``: ``feat = c_proj(v_proj(x))`` as 1x1 convolutions on the last stage's
map): every position of the trunk's stride-32 output goes through the attention pool's value projection and its
output projection ``c_proj``, no query-key attention. A "patch" is then one 32 x 32 pixel cell (the trunk's
stride), the grid the attention pool's positional embedding was trained for is ``image_size / 32`` a side, and a
32k-px input gives a k x k grid. Positions: CLIP's attention pool adds its positional embedding to every position
before the projections, and here its spatial rows, resampled bicubically to the grid as for ViTs, are added
(``positions=True``, the default); the authors' head adds none (``positions=False`` reproduces theirs). Their
class position is the mean token, which their plain path never forms (it is only the query of the pooled output):
the class row of the embedding is not used. ``path="final"`` is refused in one line (the pool gives one pooled
token per image, no per-position final tokens), ``layer`` names the attention pool only (depth 1), ``value_mlp``
does not apply (the pool has no residual or MLP), and there is no token stream block by block (``embed`` /
``block`` refuse in one line).

Everything runs in fp32 torch without autograd, whatever :meth:`Backbone.set_inference` chose. Supported:
open_clip ``VisionTransformer`` towers with a projection, open_clip ``ModifiedResNet`` towers (value path) and
Hugging Face ``CLIPModel``; anything else raises :class:`DenseFeaturesUnavailableError` in one line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import CliplabError, DenseFeaturesUnavailableError
from .backbone import Backbone

PATHS = ("final", "value")
INPUTS = ("model", "aspect", "sliding")
ENCODING = "fp32-torch"  # dense features always run the torch model in fp32
WINDOW_BATCH = 256  # sliding windows run through the tower at most this many at a time
RESNET_STRIDE = 32  # open_clip ModifiedResNet: stem (x4) and layer2-4 (x2 each)


@dataclass(frozen=True)
class DenseSpec:
    """What to extract: ``path`` (final | value) at block ``layer`` (negative counts from the end) from
    ``input`` (model | aspect | sliding) images. ``resolution``: the shorter side in pixels for aspect/sliding
    (None: the model's); ``max_side``: aspect's cap on the longer side; ``stride``: the sliding step in pixels,
    a multiple of the patch size (None: half the window, in whole patches); ``value_mlp``: the value path keeps
    the residual and the MLP (MaskCLIP, GL-MCM)."""

    path: str = "final"
    layer: int = -1
    input: str = "model"
    resolution: int | None = None
    stride: int | None = None
    max_side: int | None = None
    value_mlp: bool = True

    def __post_init__(self):
        if self.path not in PATHS:
            raise CliplabError(f"dense path must be one of {', '.join(PATHS)}; got {self.path!r}")
        if self.input not in INPUTS:
            raise CliplabError(f"dense input must be one of {', '.join(INPUTS)}; got {self.input!r}")
        for name in ("resolution", "stride", "max_side"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise CliplabError(f"dense {name} must be a positive integer or None; got {value!r}")
        if not isinstance(self.layer, int) or isinstance(self.layer, bool):
            raise CliplabError(f"dense layer must be an integer; got {self.layer!r}")
        if not isinstance(self.value_mlp, bool):
            raise CliplabError(f"dense value_mlp must be True or False; got {self.value_mlp!r}")
        unused = [name for name, modes in (("resolution", ("aspect", "sliding")), ("stride", ("sliding",)),
                                           ("max_side", ("aspect",)))
                  if getattr(self, name) is not None and self.input not in modes]
        if unused:
            raise CliplabError(f"dense {unused[0]} does not apply to input={self.input!r}")


def resample_positions(positions: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]
                       ) -> torch.Tensor:
    """Positional embeddings (1 + gh*gw, width) for ``old_grid`` -> (1 + h*w, width) for ``new_grid``: the patch
    part resampled bicubically (``align_corners=False``, no antialiasing: as MaskCLIP's and transformers'
    ``interpolate_pos_encoding``; open_clip's checkpoint helper ``resize_pos_embed`` antialiases, which changes
    the cubic kernel), the class-token row kept."""
    if tuple(old_grid) == tuple(new_grid):
        return positions
    width = positions.shape[-1]
    cls, patches = positions[:1], positions[1:]
    if patches.shape[0] != old_grid[0] * old_grid[1]:
        raise CliplabError(f"{patches.shape[0]} patch positions do not form a {old_grid[0]}x{old_grid[1]} grid")
    image = patches.reshape(1, old_grid[0], old_grid[1], width).permute(0, 3, 1, 2)
    resized = F.interpolate(image.float(), size=tuple(new_grid), mode="bicubic", align_corners=False)
    resized = resized.to(positions.dtype).permute(0, 2, 3, 1).reshape(-1, width)
    return torch.cat([cls, resized])


class DenseTower:
    """A ViT image tower seen block by block: ``embed`` -> ``block``/``value`` -> ``head``."""

    name: str
    patch: tuple[int, int]
    grid: tuple[int, int]  # the grid the positional embeddings were trained for
    depth: int
    paths: tuple[str, ...] = PATHS  # the paths this tower gives

    def check_path(self, path: str) -> None:
        """Nothing for a path this tower gives, else DenseFeaturesUnavailableError in one line."""
        if path not in self.paths:
            raise DenseFeaturesUnavailableError(f"{self.name}: dense path {path!r} is not available; this tower "
                                                f"gives {', '.join(self.paths)}")

    @property
    def image_size(self) -> tuple[int, int]:
        return self.grid[0] * self.patch[0], self.grid[1] * self.patch[1]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Class token + patch embeddings + positions (resampled to the images' grid), pre-norm: (n, 1+h*w, width)."""
        raise NotImplementedError

    def block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def value(self, index: int, x: torch.Tensor, mlp: bool = True) -> torch.Tensor:
        """MaskCLIP's value path through block ``index`` (see the module docstring)."""
        raise NotImplementedError

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and projection of the patch tokens: (n, h*w, d), unnormalised."""
        raise NotImplementedError

    def resolve_layer(self, layer: int) -> int:
        if not -self.depth <= layer < self.depth:
            raise CliplabError(f"{self.name}: dense layer {layer} is outside the tower's {self.depth} blocks "
                               f"(use 0..{self.depth - 1} or negative from the end)")
        return layer % self.depth

    def grid_of(self, images: torch.Tensor) -> tuple[int, int]:
        height, width = images.shape[-2:]
        if height % self.patch[0] or width % self.patch[1]:
            raise CliplabError(f"{self.name}: image size {height}x{width} is not a whole number of "
                               f"{self.patch[0]}x{self.patch[1]} patches")
        return height // self.patch[0], width // self.patch[1]

    def tokens(self, images: torch.Tensor, path: str = "final", layer: int = -1, value_mlp: bool = True
               ) -> torch.Tensor:
        """Projected patch tokens (n, h, w, d), unnormalised, for images whose sides are whole patches."""
        h, w = self.grid_of(images)
        last = self.resolve_layer(layer)
        x = self.embed(images)
        for index in range(last):
            x = self.block(index, x)
        x = self.value(last, x, value_mlp) if path == "value" else self.block(last, x)
        out = self.head(x)
        return out.reshape(out.shape[0], h, w, out.shape[-1])


class OpenClipTower(DenseTower):
    """open_clip ``VisionTransformer`` (conv1, class_embedding, positional_embedding, ln_pre, resblocks,
    ln_post, proj)."""

    def __init__(self, backbone: Backbone):
        visual = getattr(backbone.model, "visual", None)
        needed = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post")
        if visual is None or not all(hasattr(visual, a) for a in needed) or getattr(visual, "proj", None) is None:
            raise DenseFeaturesUnavailableError(
                f"{backbone.info.name}: dense features need a ViT image tower with a projection; "
                f"this one is {type(visual).__name__}")
        self.name = backbone.info.name
        self.visual = visual
        self.blocks = visual.transformer.resblocks
        self.batch_first = bool(getattr(visual.transformer, "batch_first", True))
        self.patch = tuple(int(p) for p in _pair(visual.patch_size))
        self.grid = tuple(int(g) for g in _pair(visual.grid_size))
        self.depth = len(self.blocks)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        visual = self.visual
        grid = self.grid_of(images)
        x = visual.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1)
        x = x + resample_positions(visual.positional_embedding, self.grid, grid).to(x.dtype)
        x = visual.patch_dropout(x)
        return visual.ln_pre(x)

    def block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if not self.batch_first:
            return self.blocks[index](x.transpose(0, 1)).transpose(0, 1)
        return self.blocks[index](x)

    def value(self, index: int, x: torch.Tensor, mlp: bool = True) -> torch.Tensor:
        block = self.blocks[index]
        attn = getattr(block, "attn", None)
        if not isinstance(attn, torch.nn.MultiheadAttention) or attn.in_proj_weight is None:
            raise DenseFeaturesUnavailableError(
                f"{self.name}: the value path needs torch MultiheadAttention with a packed in_proj_weight; "
                f"block {index} has {type(attn).__name__}")
        width = attn.embed_dim
        bias = None if attn.in_proj_bias is None else attn.in_proj_bias[2 * width:]
        v = attn.out_proj(F.linear(block.ln_1(x), attn.in_proj_weight[2 * width:], bias))
        if not mlp:
            return v
        v = x + block.ls_1(v)
        return v + block.ls_2(block.mlp(block.ln_2(v)))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual.ln_post(x)[:, 1:] @ self.visual.proj


class HFClipTower(DenseTower):
    """transformers ``CLIPModel``: vision_model (embeddings, pre_layrnorm, encoder.layers, post_layernorm) and
    visual_projection."""

    def __init__(self, backbone: Backbone):
        model = backbone.model
        self.name = backbone.info.name
        self.vision = model.vision_model
        self.projection = model.visual_projection
        emb = self.vision.embeddings
        self.blocks = self.vision.encoder.layers
        self.patch = (int(emb.patch_size),) * 2
        side = int(emb.image_size) // int(emb.patch_size)
        self.grid = (side, side)
        self.depth = len(self.blocks)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        emb = self.vision.embeddings
        grid = self.grid_of(images)
        patches = emb.patch_embedding(images.to(emb.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([emb.class_embedding.expand(patches.shape[0], 1, -1), patches], dim=1)
        if grid == self.grid:
            x = x + emb.position_embedding(emb.position_ids)
        else:
            x = x + resample_positions(emb.position_embedding.weight, self.grid, grid).unsqueeze(0)
        return self.vision.pre_layrnorm(x)

    def block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks[index](x, None)
        return out[0] if isinstance(out, tuple) else out  # transformers 4.x returns a tuple

    def value(self, index: int, x: torch.Tensor, mlp: bool = True) -> torch.Tensor:
        layer = self.blocks[index]
        attn = layer.self_attn
        v = attn.out_proj(attn.v_proj(layer.layer_norm1(x)))
        if not mlp:
            return v
        v = x + v
        return v + layer.mlp(layer.layer_norm2(v))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.vision.post_layernorm(x[:, 1:]))


class OpenClipResNetTower(DenseTower):
    """open_clip ``ModifiedResNet`` (stem, layer1-4 at stride 32, ``attnpool``): MaskCLIP's RN value path only
    (module docstring). ``positions``: add the attention pool's spatial positional embedding (resampled to the
    grid) before the value projection, as CLIP's pool does; False as MaskCLIP's head."""

    depth = 1  # the attention pool: the only "block" whose value path is taken
    paths = ("value",)

    def check_path(self, path: str) -> None:
        if path != "value":
            raise DenseFeaturesUnavailableError(
                f"{self.name}: an open_clip ModifiedResNet's attention pool gives one pooled token per image, not "
                f"per-position {path!r} tokens; use path='value' (MaskCLIP's RN value path)")

    def __init__(self, backbone: Backbone, positions: bool = True):
        visual = getattr(backbone.model, "visual", None)
        pool = getattr(visual, "attnpool", None)
        needed = ("stem", "layer1", "layer2", "layer3", "layer4")
        if pool is None or not all(hasattr(visual, a) for a in needed) or not all(
                hasattr(pool, a) for a in ("positional_embedding", "v_proj", "c_proj")):
            raise DenseFeaturesUnavailableError(
                f"{backbone.info.name}: dense features of a ResNet need open_clip's ModifiedResNet with an attention "
                f"pool; this one is {type(visual).__name__}")
        self.name = backbone.info.name
        self.visual, self.pool, self.positions = visual, pool, bool(positions)
        side = round((pool.positional_embedding.shape[0] - 1) ** 0.5)
        size = _pair(getattr(visual, "image_size", side * RESNET_STRIDE))
        if side * side + 1 != pool.positional_embedding.shape[0] or any(s != side * RESNET_STRIDE for s in size):
            raise DenseFeaturesUnavailableError(
                f"{self.name}: the attention pool's {pool.positional_embedding.shape[0]} positions do not match a "
                f"{size[0]}x{size[1]} input at stride {RESNET_STRIDE}")
        self.patch = (RESNET_STRIDE, RESNET_STRIDE)
        self.grid = (side, side)

    def resolve_layer(self, layer: int) -> int:
        if layer not in (0, -1):
            raise DenseFeaturesUnavailableError(
                f"{self.name}: a ResNet tower's dense features come from its attention pool only (layer -1 or 0), "
                f"not layer {layer}: it has no token stream block by block (ViT towers only); use path='value'")
        return 0

    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        """The last stage's map (n, C, h, w) at stride 32: stem, layer1..layer4."""
        visual = self.visual
        x = visual.stem(images.to(visual.conv1.weight.dtype))
        for stage in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
            x = stage(x)
        return x

    def _no_stream(self, what: str):
        raise DenseFeaturesUnavailableError(
            f"{self.name}: a ResNet tower has no token stream block by block ({what}; ViT towers only); its dense "
            "features are path='value' (MaskCLIP's RN value path)")

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        self._no_stream("embed")

    def block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        self._no_stream("block")

    def value(self, index: int, x: torch.Tensor, mlp: bool = True) -> torch.Tensor:
        self._no_stream("value of a block")

    def head(self, x: torch.Tensor) -> torch.Tensor:
        self._no_stream("head")

    def tokens(self, images: torch.Tensor, path: str = "final", layer: int = -1, value_mlp: bool = True
               ) -> torch.Tensor:
        """MaskCLIP's RN value path (n, h, w, d), unnormalised: ``c_proj(v_proj(x_p + pos_p))`` at every position
        ``p`` of the trunk's map (``pos`` only with ``positions``); ``value_mlp`` does not apply."""
        self.check_path(path)
        self.resolve_layer(layer)
        h, w = self.grid_of(images)
        x = self.trunk(images)
        if tuple(x.shape[-2:]) != (h, w):
            raise CliplabError(f"{self.name}: the trunk gave a {x.shape[-2]}x{x.shape[-1]} map for a {h}x{w} grid")
        x = x.flatten(2).transpose(1, 2)  # (n, h*w, C), row-major positions as the pool's embedding
        if self.positions:
            x = x + resample_positions(self.pool.positional_embedding, self.grid, (h, w))[1:].to(x.dtype)
        out = self.pool.c_proj(self.pool.v_proj(x))
        return out.reshape(out.shape[0], h, w, out.shape[-1])


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def dense_tower(backbone: Backbone) -> DenseTower:
    """The block-by-block view of ``backbone``'s image tower, or DenseFeaturesUnavailableError (one line)."""
    from .hf import HFClipBackbone
    from .openclip import OpenClipBackbone

    if isinstance(backbone.model, torch.jit.ScriptModule):
        raise DenseFeaturesUnavailableError(
            f"{backbone.info.name}: dense features are not available for a TorchScript model; load its weights "
            "as a state dict or safetensors instead")
    if isinstance(backbone, OpenClipBackbone):
        if hasattr(getattr(backbone.model, "visual", None), "attnpool"):
            return OpenClipResNetTower(backbone)
        return OpenClipTower(backbone)
    if isinstance(backbone, HFClipBackbone):
        return HFClipTower(backbone)
    raise DenseFeaturesUnavailableError(
        f"{backbone.info.name}: dense features need an open_clip ViT or ResNet or a Hugging Face CLIPModel; "
        f"this backbone is {type(backbone).__name__}")


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Window offsets along one side: every ``stride`` pixels, the last one flush with the end."""
    if size < window:
        raise CliplabError(f"a {size}-pixel side is smaller than the {window}-pixel window")
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def sliding_stride(tower: DenseTower, spec: DenseSpec) -> int:
    """The sliding step in pixels: ``spec.stride`` (a multiple of the patch) or half the window in whole patches."""
    patch = tower.patch[0]
    if spec.stride is None:
        return max(patch, (min(tower.image_size) // 2) // patch * patch)
    if spec.stride % patch or tower.patch[0] != tower.patch[1]:
        raise CliplabError(f"{tower.name}: sliding stride {spec.stride} is not a multiple of the patch size {patch}")
    return spec.stride


@torch.no_grad()
def dense_tokens(backbone: Backbone, images: torch.Tensor, spec: DenseSpec = DenseSpec()) -> torch.Tensor:
    """L2-normalised float32 patch tokens (n, h, w, d) on the CPU for a batch of preprocessed images whose sides
    are whole patches (the output of :func:`dense_transform`); ``spec.input == "sliding"`` runs windows of the
    model's size over them and averages (module docstring)."""
    tower = dense_tower(backbone)
    training = backbone.model.training
    backbone.model.eval()  # a derived copy in training mode would drop patches (open_clip's patch dropout)
    try:
        return _dense_tokens(tower, images.to(backbone.device, torch.float32), spec)
    finally:
        backbone.model.train(training)


def _dense_tokens(tower: DenseTower, images: torch.Tensor, spec: DenseSpec) -> torch.Tensor:
    if spec.input != "sliding":
        out = tower.tokens(images, spec.path, spec.layer, spec.value_mlp)
        return F.normalize(out.float(), dim=-1).cpu()
    (wh, ww), (ph, pw) = tower.image_size, tower.patch
    stride = sliding_stride(tower, spec)
    h, w = tower.grid_of(images)
    tops = window_starts(images.shape[-2], wh, stride)
    lefts = window_starts(images.shape[-1], ww, stride)
    offsets = [(top, left) for top in tops for left in lefts]
    crops = torch.cat([images[..., top:top + wh, left:left + ww] for top, left in offsets])
    tokens = torch.cat([F.normalize(tower.tokens(chunk, spec.path, spec.layer, spec.value_mlp).float(), dim=-1)
                        for chunk in crops.split(WINDOW_BATCH)])
    n = images.shape[0]
    total = torch.zeros((n, h, w, tokens.shape[-1]), dtype=torch.float32, device=tokens.device)
    for k, (top, left) in enumerate(offsets):
        total[:, top // ph:(top + wh) // ph, left // pw:(left + ww) // pw] += tokens[k * n:(k + 1) * n]
    return F.normalize(total, dim=-1).cpu()


def input_size(patch: tuple[int, int], window: tuple[int, int], spec: DenseSpec, width: int, height: int
               ) -> tuple[int, int]:
    """(height, width) in pixels the aspect/sliding input resizes a ``width`` x ``height`` image to, for a
    model with ``patch`` (h, w) patches and a ``window`` (h, w) input: shorter side
    ``resolution`` (default: the model's), aspect kept, sides rounded to whole patches (at least one patch, and
    at least a window for sliding), the longer side capped at ``max_side`` (aspect)."""
    (ph, pw), (wh, ww) = patch, window
    short = spec.resolution or min(wh, ww)
    scale = short / min(width, height)
    if spec.input == "aspect" and spec.max_side is not None and max(width, height) * scale > spec.max_side:
        scale = spec.max_side / max(width, height)
    out_h = max(ph, round(height * scale / ph) * ph)
    out_w = max(pw, round(width * scale / pw) * pw)
    if spec.input == "aspect" and spec.max_side is not None:
        out_h = max(ph, min(out_h, spec.max_side // ph * ph))
        out_w = max(pw, min(out_w, spec.max_side // pw * pw))
    if spec.input == "sliding":
        out_h, out_w = max(out_h, wh), max(out_w, ww)
    return out_h, out_w


def dense_transform(backbone: Backbone, spec: DenseSpec = DenseSpec()) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> tensor for ``spec.input``: the backbone's own transform for ``model``, else the aspect-kept
    resize of :func:`input_size` with the model's interpolation, mean and std (no crop)."""
    if spec.input == "model":
        return backbone.preprocess
    tower = dense_tower(backbone)
    config = backbone.preprocess_config
    if "mean" not in config or "std" not in config:
        raise DenseFeaturesUnavailableError(
            f"{backbone.info.name}: input={spec.input!r} needs the model's normalisation (mean, std), which its "
            "preprocessing config does not give")
    return _AspectTransform(tower, spec, config)


class _AspectTransform:
    """Picklable (DataLoader workers) aspect-kept resize + normalisation."""

    def __init__(self, tower: DenseTower, spec: DenseSpec, config: dict):
        self.patch, self.image_size, self.spec = tower.patch, tower.image_size, spec
        self.mean = [float(v) for v in config["mean"]]
        self.std = [float(v) for v in config["std"]]
        self.interpolation = str(config.get("interpolation", "bicubic"))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        height, width = input_size(self.patch, self.image_size, self.spec, *image.size)
        mode = InterpolationMode(self.interpolation) if self.interpolation in {m.value for m in InterpolationMode} \
            else InterpolationMode.BICUBIC
        resized = TF.resize(image.convert("RGB"), [height, width], interpolation=mode, antialias=True)
        return TF.normalize(TF.to_tensor(resized), self.mean, self.std)


def dense_key(backbone: Backbone, spec: DenseSpec = DenseSpec()) -> dict:
    """What an extraction is, for cache keys and results: model, preprocessing, encoding, path, resolved layer,
    input mode and its resolved sizes."""
    tower = dense_tower(backbone)
    key = {"kind": "dense", "format": 1, "model_id": backbone.model_id, "preprocess": backbone.preprocess_id,
           "encoding": ENCODING, "dim": int(backbone.embed_dim), "depth": tower.depth, "patch": list(tower.patch),
           **asdict(spec)}
    tower.check_path(spec.path)
    key["layer"] = tower.resolve_layer(spec.layer)
    if spec.path != "value" or isinstance(tower, OpenClipResNetTower):
        key.pop("value_mlp")  # ResNet: the attention pool has no residual or MLP
    if isinstance(tower, OpenClipResNetTower):
        key["positions"] = tower.positions
    if spec.input == "model":
        key["resolution"] = key["stride"] = key["max_side"] = None
    else:
        key["resolution"] = spec.resolution or min(tower.image_size)
        key["stride"] = sliding_stride(tower, spec) if spec.input == "sliding" else None
        if spec.input == "sliding":
            key["max_side"] = None
    return key
