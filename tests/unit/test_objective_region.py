"""CLOC (paper 44) and GRAIN (paper 6) region objectives: RoI pooling of hand grids, the region losses by hand, no
boxes = the clip loss, and the full loss = clip + weight * region on the tiny model with gradients reaching the
projection."""

import math

import pytest
import torch

from cliplab.errors import CliplabError
from cliplab.train.engine import get_objective, list_objectives
from cliplab.train.objectives_region import image_and_grid, pool_regions, region_text_loss


def test_whole_image_box_is_the_mean_of_the_patches():
    grid = torch.randn(2, 5, 3, 4, generator=torch.Generator().manual_seed(0))  # 3x4 patches of 8 px
    boxes = torch.tensor([[1.0, 0, 0, 32, 24], [0.0, 0, 0, 32, 24]])
    got = pool_regions(grid, boxes, 8)
    assert torch.allclose(got, torch.stack([grid[1].mean((1, 2)), grid[0].mean((1, 2))]), atol=1e-6)


def test_roi_pooling_hand_cases():
    # one channel, 2x2 grid of 10-px patches with values [[1, 2], [3, 4]]
    grid = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    left = pool_regions(grid, torch.tensor([[0.0, 0, 0, 10, 20]]), 10, (2, 1))
    assert left.item() == pytest.approx((1 + 3) / 2)  # the left column's two patch centres
    top_left = pool_regions(grid, torch.tensor([[0.0, 0, 0, 10, 10]]), 10, (1, 1))
    assert top_left.item() == pytest.approx(1.0)
    # one sample at pixel (10, 10) = grid point (0.5, 0.5): the bilinear mean of all four patches
    centre = pool_regions(grid, torch.tensor([[0.0, 5, 5, 15, 15]]), 10, (1, 1))
    assert centre.item() == pytest.approx(2.5)
    # a sample a quarter of the way: x at grid 0.25 between columns, y on row 0 -> 1 * 0.75 + 2 * 0.25
    quarter = pool_regions(grid, torch.tensor([[0.0, 5, 0, 10, 10]]), 10, (1, 1))
    assert quarter.item() == pytest.approx(1.25)


def _ce(row, target):
    lse = math.log(sum(math.exp(v) for v in row))
    return -sum(t * (v - lse) for v, t in zip(row, target, strict=True))


def test_region_text_loss_hand_computed():
    regions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])  # row 2 is named by no region: left out
    index = torch.tensor([0, 1, 0])
    scale = 3.0
    logits = [[scale * sum(a * b for a, b in zip(r, t, strict=True)) for t in texts.tolist()] for r in regions.tolist()]
    to_text = sum(_ce(row, [float(j == k) for j in range(3)]) for row, k in zip(logits, [0, 1, 0], strict=True)) / 3
    cols = [list(c) for c in zip(*logits, strict=True)]
    to_region = (_ce(cols[0], [0.5, 0.0, 0.5]) + _ce(cols[1], [0.0, 1.0, 0.0])) / 2  # text 0 has two positives
    got = region_text_loss(regions, texts, index, torch.tensor(scale))
    assert got.item() == pytest.approx((to_text + to_region) / 2, rel=1e-6)


def test_distinct_region_texts_give_the_clip_loss_on_pairs():
    from open_clip.loss import ClipLoss

    gen = torch.Generator().manual_seed(1)
    r = torch.nn.functional.normalize(torch.randn(5, 8, generator=gen), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(5, 8, generator=gen), dim=-1)
    got = region_text_loss(r, t, torch.arange(5), torch.tensor(4.0))
    assert got.item() == pytest.approx(ClipLoss()(r, t, torch.tensor(4.0)).item(), rel=1e-6)


@pytest.fixture(scope="module")
def tiny_batch():
    from cliplab.models import load_model

    model = load_model("tiny")
    size = model.preprocess_config.get("size", 224)
    size = size[0] if isinstance(size, list | tuple) else size
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    tokens = model.tokenize(["a cat next to a dog", "a truck and a bird"])
    return model, size, {"images": images, "tokens": tokens}


def test_cloc_without_boxes_is_the_clip_loss_and_with_boxes_adds_the_region_term(tiny_batch):
    model, size, batch = tiny_batch
    assert "cloc" in list_objectives()
    work = model.derive("cloc", trainable=True)
    clip, _ = get_objective("clip")(work, batch)
    cloc = get_objective("cloc", region_weight=0.7)
    assert cloc(work, batch)[0].item() == pytest.approx(clip.item(), abs=1e-6)
    empty = dict(batch, boxes=torch.zeros(0, 5), region_tokens=batch["tokens"], region_text_index=torch.zeros(0))
    assert cloc(work, empty)[0].item() == pytest.approx(clip.item(), abs=1e-6)
    half = size / 2
    boxes = torch.tensor([[0, 0, 0, half, size], [0, half, 0, size, size], [1, 0, 0, size, half],
                          [1, 0, half, size, size]], dtype=torch.float32)
    names = model.tokenize(["cat", "dog", "truck"])
    region_batch = dict(batch, boxes=boxes, region_tokens=names, region_text_index=torch.tensor([0, 1, 2, 1]))
    total, logs = cloc(work, region_batch)
    assert logs["clip"] == pytest.approx(clip.item(), abs=1e-5)
    # the region term written out from the pieces: pooled grid regions against the names' features
    img, grid = image_and_grid(work.model, batch["images"])
    assert torch.allclose(img, work.model.encode_image(batch["images"]), atol=1e-5)
    regions = torch.nn.functional.normalize(pool_regions(grid, boxes, size / grid.shape[-1], (2, 2)), dim=-1)
    names_f = work.model.encode_text(names, normalize=True)
    region = region_text_loss(regions, names_f, torch.tensor([0, 1, 2, 1]), work.model.logit_scale.exp())
    assert logs["region"] == pytest.approx(region.item(), abs=1e-5)
    assert total.item() == pytest.approx(clip.item() + 0.7 * region.item(), abs=1e-5)
    total.backward()
    assert work.model.visual.proj.grad is not None and work.model.visual.proj.grad.abs().sum() > 0
    bad = dict(region_batch, boxes=torch.tensor([[0.0, 0, 0, size + 5, size]]),
               region_text_index=torch.tensor([0]))
    with pytest.raises(CliplabError, match="leaves the"):
        cloc(work, bad)
    with pytest.raises(CliplabError, match="a row of the 3 region texts"):
        cloc(work, dict(region_batch, region_text_index=torch.tensor([0, 1, 2, 3])))
    with pytest.raises(CliplabError, match="needs region_tokens"):
        cloc(work, {key: value for key, value in region_batch.items() if key != "region_tokens"})


def test_grain_word_loss_hand_computed():
    from cliplab.train.objectives_region import region_to_text_loss

    regions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])  # every row is a candidate, named or not
    scale = 2.5
    logits = [[scale * sum(a * b for a, b in zip(r, t, strict=True)) for t in texts.tolist()] for r in regions.tolist()]
    want = sum(_ce(row, [float(j == k) for j in range(3)]) for row, k in zip(logits, [2, 1, 0], strict=True)) / 3
    got = region_to_text_loss(regions, texts, torch.tensor([2, 1, 0]), torch.tensor(scale))
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_grain_without_boxes_is_the_clip_loss_and_with_boxes_adds_the_word_term(tiny_batch):
    from cliplab.train.objectives_region import region_to_text_loss

    model, size, batch = tiny_batch
    assert "grain" in list_objectives()
    work = model.derive("grain", trainable=True)
    clip, _ = get_objective("clip")(work, batch)
    grain = get_objective("grain", region_weight=0.4)
    assert grain.needs_boxes and get_objective("cloc").needs_boxes and not hasattr(get_objective("clip"), "needs_boxes")
    assert grain(work, batch)[0].item() == pytest.approx(clip.item(), abs=1e-6)
    empty = dict(batch, boxes=torch.zeros(0, 5), region_tokens=batch["tokens"], region_text_index=torch.zeros(0))
    assert grain(work, empty)[0].item() == pytest.approx(clip.item(), abs=1e-6)
    half = size / 2
    boxes = torch.tensor([[0, 0, 0, half, half], [1, half, half, size, size], [1, 0, 0, size, size]],
                         dtype=torch.float32)
    descriptions = model.tokenize(["a cat has pointed ears and whiskers", "a truck has a large cargo box"])
    index = torch.tensor([0, 1, 1])
    region_batch = dict(batch, boxes=boxes, region_tokens=descriptions, region_text_index=index)
    total, logs = grain(work, region_batch)
    img, grid = image_and_grid(work.model, batch["images"])
    regions = torch.nn.functional.normalize(pool_regions(grid, boxes, size / grid.shape[-1], (2, 2)), dim=-1)
    texts = work.model.encode_text(descriptions, normalize=True)
    scale = work.model.logit_scale.exp()
    word = region_to_text_loss(regions, texts, index, scale)
    assert logs["region"] == pytest.approx(word.item(), abs=1e-5)
    assert logs["clip"] == pytest.approx(clip.item(), abs=1e-5)
    assert total.item() == pytest.approx(clip.item() + 0.4 * word.item(), abs=1e-5)
    # GRAIN's term is one-directional: it differs from CLOC's symmetric one on the same regions
    assert abs(word.item() - region_text_loss(regions, texts, index, scale).item()) > 1e-4
    total.backward()
    assert work.model.visual.proj.grad is not None and work.model.visual.proj.grad.abs().sum() > 0
    with pytest.raises(CliplabError, match="grain: a box leaves the"):
        grain(work, dict(region_batch, boxes=torch.tensor([[0.0, 0, 0, size + 1, size]]),
                         region_text_index=torch.tensor([0])))
