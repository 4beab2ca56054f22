"""DenseCLIP (dense/denseclip.py): plain prompts at gamma = 0, the score map as a loop, frozen CLIP, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cliplab.data.segmentation import SegmentationDataset
from cliplab.dense.denseclip import DenseCLIPModel, DenseCLIPObjective, load_denseclip, score_map, train_denseclip
from cliplab.errors import CliplabError
from cliplab.models import load_model

NAMES = ["cat", "dog", "car"]


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


class Squares(SegmentationDataset):
    """Two 64-px images, each half one class, half another (masks exact)."""

    name = "squares"

    def __init__(self):
        self.class_names = list(NAMES)

    def __len__(self):
        return 2

    def item_id(self, index):
        return f"sq{index}"

    def load_image(self, index):
        from PIL import Image

        rng = np.random.default_rng(index)
        return Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))

    def load_mask(self, index):
        mask = np.zeros((64, 64), np.uint8)
        mask[:, 32:] = 1 + index
        return mask


def test_gamma_zero_gives_plain_prompts(tiny):
    model = DenseCLIPModel(tiny, NAMES, ctx_init="a photo of a").eval()
    with torch.no_grad():
        model.gamma.zero_()
        text = F.normalize(model.text_embeddings(), dim=-1)
        plain = tiny.encode_texts([f"a photo of a {c}." for c in NAMES]).to(text)
        np.testing.assert_allclose(text.cpu().numpy(), plain.cpu().numpy(), atol=1e-5)
        images = torch.randn(2, 3, *model.tower.image_size)
        pooled, dense = model.visual(images)
        scores = model.scores(pooled, dense)
        # with gamma = 0 and the zero-initialised adapter: the cosine of each patch to the plain prompts
        expected = torch.einsum("ndhw,kd->nkhw", F.normalize(dense, dim=1), plain)
    np.testing.assert_allclose(scores.numpy(), expected.numpy(), atol=1e-5)


def test_context_decoder_changes_text_when_gamma_nonzero(tiny):
    model = DenseCLIPModel(tiny, NAMES).eval()
    with torch.no_grad():
        pooled, dense = model.visual(torch.randn(1, 3, *model.tower.image_size))
        base = model.scores(pooled, dense)
        model.gamma.fill_(1.0)
        assert (model.scores(pooled, dense) - base).abs().max() > 1e-4


def test_score_map_equals_per_patch_cosine_loop():
    rng = torch.Generator().manual_seed(0)
    dense, text = torch.randn(2, 5, 3, 4, generator=rng), torch.randn(2, 6, 5, generator=rng)
    out = score_map(dense, text)
    for n in range(2):
        for k in range(6):
            for i in range(3):
                for j in range(4):
                    v, t = dense[n, :, i, j], text[n, k]
                    cos = float(v @ t) / (float(v.norm()) * float(t.norm()))
                    assert abs(float(out[n, k, i, j]) - cos) < 1e-5


def test_training_step_keeps_clip_frozen_and_saves(tiny, tmp_path):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    model, summary = train_denseclip(tiny, Squares(), tmp_path, epochs=1, batch_size=4, lr=1e-2)
    after = tiny.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert summary["windows"] == 8 and summary["steps"] == 2  # two 64-px images, four 32-px windows each
    fresh = DenseCLIPModel(tiny, NAMES)
    assert not torch.equal(fresh.learner.ctx, model.learner.ctx)  # the context did train
    loaded = load_denseclip(tmp_path, tiny, NAMES)
    with torch.no_grad():
        images = torch.randn(2, 3, *model.tower.image_size)
        np.testing.assert_allclose(loaded(images).numpy(), model.eval()(images).numpy(), atol=1e-6)


def test_objective_is_pixel_cross_entropy(tiny):
    model = DenseCLIPModel(tiny, NAMES).eval()
    pooled, dense = model.visual(torch.randn(1, 3, *model.tower.image_size))
    mask = torch.zeros(1, 32, 32, dtype=torch.uint8)
    mask[:, :, 16:] = 2
    mask[:, 0, 0] = 255
    loss, _ = DenseCLIPObjective(tau=0.07)(model, {"pooled": pooled, "dense": dense, "mask": mask})
    with torch.no_grad():
        logits = F.interpolate(model.scores(pooled, dense) / 0.07, size=(32, 32), mode="bilinear",
                               align_corners=False)
        logp = torch.log_softmax(logits, dim=1)[0]
        keep = mask[0] != 255
        picked = logp.gather(0, mask.long().clamp(max=2))[0][keep]
    assert abs(float(loss.detach()) + float(picked.mean())) < 1e-5


def test_segmenter_runs_denseclip_from_weights(tiny, tmp_path):
    from cliplab.dense.inference import Segmenter

    train_denseclip(tiny, Squares(), tmp_path, epochs=1, batch_size=8)
    seg = Segmenter(tiny, "denseclip", ["cat", "dog"], params={"weights": str(tmp_path)})
    out = seg.segment(Squares().load_image(0))
    assert out.labels.shape == (64, 64) and set(np.unique(out.labels)) <= {0, 1}


def test_bad_inputs_one_line(tiny, tmp_path):
    from cliplab.dense.inference import Segmenter

    with pytest.raises(CliplabError) as err:
        Segmenter(tiny, "denseclip", NAMES, params={"weights": str(tmp_path / "missing")})
    assert "\n" not in str(err.value) and "denseclip.json" in str(err.value)
    with pytest.raises(CliplabError) as err:
        Segmenter(tiny, "denseclip", NAMES, params={"tau": 0.0})
    assert "\n" not in str(err.value)
    with pytest.raises(CliplabError) as err:
        DenseCLIPModel(tiny, NAMES, decoder_width=30, decoder_heads=4)
    assert "\n" not in str(err.value)
