import numpy as np
import torch

from cliplab.models import load_model


def test_tiny_embeddings_are_normalised_float32(tiny):
    images = torch.randn(4, 3, 32, 32)
    feats = tiny.encode_images(images)
    texts = tiny.encode_texts(["a cat", "a dog", "a car"])
    assert feats.shape == (4, tiny.embed_dim) and texts.shape == (3, tiny.embed_dim)
    assert feats.dtype == torch.float32 and texts.dtype == torch.float32
    np.testing.assert_allclose(feats.norm(dim=-1).numpy(), 1.0, atol=1e-5)
    np.testing.assert_allclose(texts.norm(dim=-1).numpy(), 1.0, atol=1e-5)


def test_tiny_is_deterministic_per_seed_and_differs_across_seeds():
    a, b, c = load_model("tiny", seed=0), load_model("tiny", seed=0), load_model("tiny", seed=1)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(a.encode_images(x), b.encode_images(x))
    assert not torch.allclose(a.encode_images(x), c.encode_images(x))
    assert a.model_id == b.model_id != c.model_id


def test_dense_features_match_pooled_projection_path(tiny):
    """Patch tokens come out of the same final norm + projection as the pooled token."""
    x = torch.randn(2, 3, 32, 32)
    dense = tiny.dense_features(x)
    grid = (32 // 8) ** 2
    assert dense.shape == (2, grid, tiny.embed_dim)
    visual = tiny.model.visual
    with torch.no_grad():
        tokens = visual.transformer(visual._embeds(x))
        expected = torch.nn.functional.normalize(visual.ln_post(tokens[:, 1:]) @ visual.proj, dim=-1)
    torch.testing.assert_close(dense, expected, atol=1e-5, rtol=1e-5)


def test_text_batches_give_same_result_as_one_batch(tiny):
    texts = [f"a photo of thing {i}" for i in range(7)]
    tiny.text_batch_size = 3
    try:
        split = tiny.encode_texts(texts)
    finally:
        tiny.text_batch_size = 256
    torch.testing.assert_close(split, tiny.encode_texts(texts), atol=1e-6, rtol=1e-6)
