"""OVSeg: masked crops as the authors' crop_with_mask (written out), an all-ones mask equals vanilla CLIP on the
crop (with and without mask tokens), the ensemble's endpoints, mask-prompt training changes only the tokens, and
the dense method's endpoints (lambda 0: the segmenter; lambda 1: each region's CLIP probability)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cliplab.dense.base import DenseContext
from cliplab.dense.ovseg import (
    MaskPrompt,
    MaskPromptObjective,
    boxes_to_masks,
    encode_regions,
    ensemble,
    load_mask_prompt,
    mask_prompt_for,
    masked_crops,
    region_probabilities,
    save_mask_prompt,
)
from cliplab.dense.registry import create_dense
from cliplab.errors import CliplabError
from cliplab.models.dense import dense_tower


@pytest.fixture(scope="module")
def vit():
    from test_segmentation_maskclip import _vit_backbone

    return _vit_backbone()


def test_masked_crop_is_the_box_with_mean_fill():
    image = torch.randn(3, 10, 12)
    mask = torch.zeros(1, 10, 12)
    mask[0, 2:6, 3:9] = 1.0
    mask[0, 2, 3] = 0.0  # a hole inside the box: filled
    regions, region_masks, valid = masked_crops(image, mask, (4, 6))
    crop = image[:, 2:6, 3:9] * mask[0, 2:6, 3:9] + (1 - mask[0, 2:6, 3:9]) * 0.0
    expected = F.interpolate(crop[None], size=(4, 6), mode="bicubic", align_corners=False)
    torch.testing.assert_close(regions, expected)
    assert valid.tolist() == [True] and region_masks.shape == (1, 1, 4, 6)
    # an empty mask is dropped, a box is the mask of its pixels
    regions, _, valid = masked_crops(image, torch.cat([mask, torch.zeros(1, 10, 12)]), (4, 6))
    assert valid.tolist() == [True, False] and len(regions) == 1
    assert boxes_to_masks([[3, 2, 9, 6]], 10, 12)[0].sum() == 24


@torch.no_grad()
def test_all_ones_mask_equals_vanilla_clip_on_the_crop(vit):
    tower = dense_tower(vit)
    image = torch.randn(3, 40, 36)
    box = torch.zeros(1, 40, 36)
    box[0, 5:29, 7:31] = 1.0  # a mask filling its box: the crop has no blank pixel
    regions, region_masks, _ = masked_crops(image, box, tower.image_size)
    crop = F.interpolate(image[None, :, 5:29, 7:31], size=tower.image_size, mode="bicubic", align_corners=False)
    vanilla = F.normalize(vit.model.encode_image(crop), dim=-1)
    torch.testing.assert_close(encode_regions(vit, regions), vanilla)
    prompt = mask_prompt_for(vit, depth=3)
    prompt.embedding.normal_()  # tokens that would change any blank patch
    torch.testing.assert_close(encode_regions(vit, regions, region_masks, prompt), vanilla, atol=1e-5, rtol=1e-4)
    # a blank patch takes the tokens: the output moves
    half = region_masks.clone()
    half[..., :, :8] = 0
    assert not torch.allclose(encode_regions(vit, regions, half, prompt), vanilla, atol=1e-3)


def test_ensemble_endpoints():
    g = torch.Generator().manual_seed(0)
    p_seg, p_clip = torch.rand(5, 4, generator=g), torch.rand(5, 4, generator=g)
    assert torch.equal(ensemble(p_seg, p_clip, 0.0), p_seg)
    assert torch.equal(ensemble(p_seg, p_clip, 1.0), p_clip)
    torch.testing.assert_close(ensemble(p_seg, p_clip, 0.7), p_seg ** 0.3 * p_clip ** 0.7)
    with pytest.raises(CliplabError):
        ensemble(p_seg, p_clip, 1.5)


def test_training_step_moves_only_the_mask_tokens(vit, tmp_path):
    from cliplab.train.engine import TrainSettings, run_training

    frozen = {k: v.clone() for k, v in vit.model.state_dict().items()}
    weights = F.normalize(torch.randn(vit.embed_dim, 3, generator=torch.Generator().manual_seed(1)), dim=0)
    prompt = mask_prompt_for(vit, depth=2)
    masks = torch.zeros(4, 1, 16, 16)
    masks[:, :, 4:12, 4:12] = 1.0

    def data(epoch):
        yield {"regions": torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(epoch)),
               "masks": masks, "labels": torch.tensor([0, 1, 2, 0])}

    run_training(prompt, MaskPromptObjective(vit, weights), data, TrainSettings(steps=1, lr=0.1, progress=False))
    assert prompt.embedding.abs().sum() > 0  # the tokens moved
    for key, value in vit.model.state_dict().items():
        assert torch.equal(value, frozen[key]), key
    path = save_mask_prompt(prompt, tmp_path / "prompt.safetensors", vit)
    assert torch.equal(load_mask_prompt(path, vit).embedding, prompt.embedding.detach())


def test_non_vit_towers_refuse_mask_prompts():
    from cliplab.models import load_model

    class Fake:
        model = torch.nn.Module()
        info = type("I", (), {"name": "fake"})()

    with pytest.raises(CliplabError):
        mask_prompt_for(Fake())
    assert isinstance(mask_prompt_for(load_model("tiny")), MaskPrompt)


@torch.no_grad()
def test_dense_method_endpoints(vit):
    tower = dense_tower(vit)
    weights = F.normalize(torch.randn(vit.embed_dim, 4, generator=torch.Generator().manual_seed(0)), dim=0)
    context = DenseContext(vit, list("abcd"), weights, tower, None)
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    seg = create_dense("maskclip")
    seg.setup(context)
    p_seg = seg.patch_scores(images)
    zero = create_dense("ovseg", ensemble_weight=0.0)
    zero.setup(context)
    torch.testing.assert_close(zero.patch_scores(images), p_seg)
    one = create_dense("ovseg", ensemble_weight=1.0)
    one.setup(context)
    out = one.patch_scores(images)
    regions = p_seg.argmax(1)
    for i in range(2):  # each region's patches carry CLIP's probabilities of that region's masked crop
        for c in torch.unique(regions[i]).tolist():
            mask = (regions[i] == c).float().repeat_interleave(4, 0).repeat_interleave(4, 1)
            crop, _, _ = masked_crops(images[i], mask[None], tower.image_size)
            expected = region_probabilities(F.normalize(vit.model.encode_image(crop), dim=-1), weights)[0]
            torch.testing.assert_close(out[i][:, regions[i] == c], expected[:, None].expand(-1, int(
                (regions[i] == c).sum())), atol=1e-5, rtol=1e-4)


def test_classify_regions_on_an_image():
    from cliplab.dense.ovseg import classify_regions
    from cliplab.models import load_model

    tiny = load_model("tiny")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    probs = classify_regions(tiny, image, ["cat", "dog"], boxes=[[0, 0, 24, 20], [8, 8, 40, 40], [5, 5, 5, 5]])
    assert probs.shape == (3, 2) and np.isnan(probs[2]).all()
    np.testing.assert_allclose(probs[:2].sum(1), 1.0, rtol=1e-5)


class _TinySet:
    """Two 16-px images: an L of class 1 or 2 (its box the whole image, a blank corner), class 0 in that corner."""

    name, split, class_names, background_index, ignore_index = "tiny-seg", "train", ["a", "b", "c"], None, 255

    def __len__(self):
        return 2

    def load_image(self, index):
        rng = np.random.default_rng(index)
        return Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))

    def load_mask(self, index):
        mask = np.full((16, 16), 2 if index else 1, dtype=np.uint8)
        mask[8:, :8] = 0
        return mask

    def describe(self):
        return {"name": self.name, "items": 2}


def test_train_dense_saves_weights_the_method_loads(vit, tmp_path):
    from cliplab.dense.ovseg import OVSeg, region_set

    regions, masks, labels = region_set(vit, _TinySet(), range(2))
    assert sorted(labels.tolist()) == [0, 0, 1, 2] and regions.shape == (4, 3, 16, 16)
    summary = OVSeg.train_dense(vit, _TinySet(), tmp_path, epochs=2, batch_size=2, lr=0.05)
    assert summary["windows"] == 4 and summary["steps"] == 4
    method = create_dense("ovseg", weights=str(tmp_path))
    tower = dense_tower(vit)
    weights = F.normalize(torch.randn(vit.embed_dim, 3, generator=torch.Generator().manual_seed(0)), dim=0)
    method.setup(DenseContext(vit, list("abc"), weights, tower, None))
    assert method.prompt_.embedding.abs().sum() > 0
