"""Dense features of open_clip ResNet towers: MaskCLIP's RN value path (attention pool's v_proj then c_proj at
every position of the stride-32 map), its positions, grid and refusals."""

from __future__ import annotations

import copy

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from PIL import Image

from cliplab.errors import CliplabError, DenseFeaturesUnavailableError
from cliplab.models import BackboneInfo
from cliplab.models.dense import DenseSpec, OpenClipResNetTower, dense_key, dense_tokens, dense_tower, dense_transform
from cliplab.models.openclip import OpenClipBackbone, transform_for


def _resnet(size: int, seed: int = 0) -> OpenClipBackbone:
    """A random open_clip ModifiedResNet CLIP taking ``size``-px images (attention pool grid size / 32)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(embed_dim=24, vision_cfg={"image_size": size, "layers": [1, 1, 1, 1], "width": 8},
                     text_cfg={"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1})
        for module in model.visual.modules():  # open_clip zeroes each block's last BatchNorm: give every one a
            if isinstance(module, torch.nn.BatchNorm2d):  # random affine map and statistics, so the map varies
                module.weight.data.uniform_(0.5, 1.5)
                module.bias.data.normal_(0.0, 0.2)
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    model.eval()
    open_clip.set_model_preprocess_cfg(model, {"size": size, "mean": (0.5,) * 3, "std": (0.5,) * 3})
    info = BackboneInfo(name=f"rn-{size}", pretrained=None, source="test", random_weights=True)
    return OpenClipBackbone(model, transform_for(model), open_clip.SimpleTokenizer(context_length=16), info,
                            f"test:rn-{size}-{seed}", "cpu")


def _pool_input(backbone: OpenClipBackbone, images: torch.Tensor) -> torch.Tensor:
    """The map (n, C, h, w) open_clip's own forward hands the attention pool (read by a hook, not by dense.py)."""
    seen = []

    def grab(module, args):
        seen.append(args[0])
        raise _Seen

    handle = backbone.model.visual.attnpool.register_forward_pre_hook(grab)
    try:
        with torch.no_grad(), pytest.raises(_Seen):
            backbone.model.visual(images)
    finally:
        handle.remove()
    assert seen[0].std() > 0.1  # a map that varies: the written-out checks compare something
    return seen[0]


class _Seen(Exception):
    """Stops open_clip's forward at the attention pool's input (the pool itself only runs at its own grid)."""


def _written_out(backbone, feat: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    """c_proj(v_proj(x_p + pos_p)) position by position, row-major, as plain matrix products: (n, h, w, d)."""
    pool = backbone.model.visual.attnpool
    n, _, h, w = feat.shape
    out = torch.empty(n, h, w, pool.c_proj.weight.shape[0])
    for i in range(h):
        for j in range(w):
            x = feat[:, :, i, j] + (0 if pos is None else pos[1 + i * w + j])
            v = x @ pool.v_proj.weight.T + pool.v_proj.bias
            out[:, i, j] = v @ pool.c_proj.weight.T + pool.c_proj.bias
    return F.normalize(out, dim=-1)


@pytest.fixture(scope="module")
def rn64():
    return _resnet(64)


@pytest.mark.parametrize("positions", [True, False])
def test_value_path_is_v_proj_then_c_proj_at_every_position_written_out(rn64, positions):
    x = torch.randn(3, 3, 64, 64)
    tower = dense_tower(rn64)
    assert isinstance(tower, OpenClipResNetTower)
    assert (tower.patch, tower.grid, tower.image_size) == ((32, 32), (2, 2), (64, 64))
    tower.positions = positions
    with torch.no_grad():
        got = F.normalize(tower.tokens(x, "value"), dim=-1)
    pos = rn64.model.visual.attnpool.positional_embedding.detach() if positions else None
    expected = _written_out(rn64, _pool_input(rn64, x), pos)
    assert got.shape == (3, 2, 2, 24)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # the default (dense_tokens) adds the positions
    torch.testing.assert_close(dense_tokens(rn64, x, DenseSpec(path="value")),
                               _written_out(rn64, _pool_input(rn64, x),
                                            rn64.model.visual.attnpool.positional_embedding.detach()),
                               atol=1e-5, rtol=1e-5)


def test_at_one_cell_with_equal_class_and_cell_positions_the_value_path_is_clips_image_embedding():
    backbone = _resnet(32)
    pool = backbone.model.visual.attnpool
    with torch.no_grad():  # the mean token of one cell is the cell: equal keys and values, any attention weights
        pool.positional_embedding[0] = pool.positional_embedding[1]
    x = torch.randn(4, 3, 32, 32)
    got = dense_tokens(backbone, x, DenseSpec(path="value"))
    assert got.shape == (4, 1, 1, 24)
    torch.testing.assert_close(got[:, 0, 0], backbone.encode_images(x), atol=1e-5, rtol=1e-5)
    different = _resnet(32)  # the class position of its own: CLIP's pooled token is no longer the value token
    assert not torch.allclose(dense_tokens(different, x, DenseSpec(path="value"))[:, 0, 0],
                              different.encode_images(x), atol=1e-3)


def test_other_grids_resample_the_positions_bicubically(rn64):
    x = torch.randn(2, 3, 96, 128)
    pos = rn64.model.visual.attnpool.positional_embedding.detach()
    cells = pos[1:].reshape(1, 2, 2, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(cells, size=(3, 4), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    resampled = torch.cat([pos[:1], resized.reshape(12, -1)])
    got = dense_tokens(rn64, x, DenseSpec(path="value"))
    assert got.shape == (2, 3, 4, 24)
    torch.testing.assert_close(got, _written_out(rn64, _pool_input(rn64, x), resampled), atol=1e-5, rtol=1e-5)


def test_a_one_cell_model_adds_its_one_position_everywhere_on_a_mosaic():
    backbone = _resnet(32)
    x = torch.randn(2, 3, 64, 96)  # a 2 x 3 mosaic of 32-px cells: bicubic resampling of a 1 x 1 grid is constant
    pos = backbone.model.visual.attnpool.positional_embedding.detach()
    constant = torch.cat([pos[:1], pos[1:2].expand(6, -1)])
    torch.testing.assert_close(dense_tokens(backbone, x, DenseSpec(path="value")),
                               _written_out(backbone, _pool_input(backbone, x), constant), atol=1e-5, rtol=1e-5)


def test_sliding_windows_of_one_cell_each_give_each_tile_its_own_token():
    backbone = _resnet(32)
    tiles = torch.randn(6, 3, 32, 32)
    mosaic = torch.cat([torch.cat(list(tiles[r * 3:(r + 1) * 3]), dim=-1) for r in range(2)], dim=-2)[None]
    got = dense_tokens(backbone, mosaic, DenseSpec(path="value", input="sliding"))  # stride 32: one window a tile
    alone = dense_tokens(backbone, tiles, DenseSpec(path="value"))[:, 0, 0]
    assert got.shape == (1, 2, 3, 24)
    torch.testing.assert_close(got[0].reshape(6, -1), alone, atol=1e-5, rtol=1e-5)


def test_final_path_layers_and_the_block_stream_are_refused_in_one_line(rn64):
    x = torch.randn(1, 3, 64, 64)
    tower = dense_tower(rn64)
    for call in (lambda: dense_tokens(rn64, x), lambda: dense_key(rn64, DenseSpec(path="final")),
                 lambda: tower.embed(x), lambda: tower.block(0, x)):
        with pytest.raises(DenseFeaturesUnavailableError) as info:
            call()
        assert "\n" not in str(info.value) and "path='value'" in str(info.value)
    with pytest.raises(DenseFeaturesUnavailableError, match="attention pool only .layer -1 or 0., not layer -2"):
        dense_tokens(rn64, x, DenseSpec(path="value", layer=-2))
    assert dense_tokens(rn64, x, DenseSpec(path="value", layer=0)).shape == (1, 2, 2, 24)
    with pytest.raises(CliplabError, match="not a whole number of 32x32 patches"):
        dense_tokens(rn64, torch.randn(1, 3, 64, 80), DenseSpec(path="value"))


def test_the_cache_key_names_the_positions_and_not_the_mlp(rn64):
    key = dense_key(rn64, DenseSpec(path="value"))
    assert key["positions"] is True and "value_mlp" not in key and key["patch"] == [32, 32]
    assert key == dense_key(rn64, DenseSpec(path="value", value_mlp=False))  # the same features
    other = copy.copy(dense_tower(rn64))
    assert other.paths == ("value",)


def test_maskclip_segments_a_resnet_mosaic_one_cell_per_tile():
    from cliplab.dense.inference import Segmenter, SegmentSettings
    from cliplab.dense.maskclip import classify_features

    backbone = _resnet(32)
    names = ["red", "green", "blue"]
    segmenter = Segmenter(backbone, "maskclip", names, templates=("a photo of a {c}.",),
                          settings=SegmentSettings(keep_size=True))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    tensor = segmenter.transform(image)
    grid, windows = segmenter.score_grid(tensor)
    assert tensor.shape == (3, 64, 64) and windows == 4 and grid.shape == (3, 2, 2)
    tokens = dense_tokens(backbone, tensor[None], DenseSpec(path="value", input="sliding"))
    expected = classify_features(tokens.permute(0, 3, 1, 2), segmenter.method.context_.text_weights, 100.0)[0]
    torch.testing.assert_close(grid, expected, atol=1e-4, rtol=1e-4)
    assert segmenter.segment(image).labels.shape == (64, 64)
    dinoiser = Segmenter(backbone, "dinoiser", names, templates=("a photo of a {c}.",))  # guidance: CLIP's block -3
    with pytest.raises(DenseFeaturesUnavailableError) as info:
        dinoiser.segment(image)
    assert "\n" not in str(info.value) and "no token stream block by block" in str(info.value)


def test_the_feature_cache_stores_the_value_path_of_a_resnet_at_its_aspect_grid(tmp_path, rn64):
    from cliplab.data import image_folder
    from cliplab.features.dense import embed_dense

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (70, 100, 3), dtype=np.uint8)).save(tmp_path / "imgs" / cls / "0.png")
    data = image_folder(tmp_path / "imgs")
    spec = DenseSpec(path="value", input="aspect")  # shorter side 64 -> 64 x 96 px: a 2 x 3 grid of cells
    out = embed_dense(rn64, data, tmp_path / "cache", spec=spec, batch_size=2, num_workers=0, progress=False)
    assert out.grid_shape == (2, 3) and out.key["positions"] is True
    images = torch.stack([dense_transform(rn64, spec)(data.load_image(int(i))) for i in out.indices])
    np.testing.assert_allclose(out.tokens, dense_tokens(rn64, images, spec).reshape(2, 6, -1).numpy(), atol=1e-6)
