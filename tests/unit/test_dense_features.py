"""Dense features: the three paths through the tower, the three inputs, and the cached value (embed_dense)."""

from __future__ import annotations

import math

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from PIL import Image

from cliplab.data import image_folder
from cliplab.errors import CliplabError, DenseFeaturesUnavailableError, FeatureError
from cliplab.features.dense import DenseFeatures, dense_cache_key, embed_dense
from cliplab.models import BackboneInfo, load_model
from cliplab.models.dense import DenseSpec, dense_tokens, dense_transform, input_size, resample_positions
from cliplab.models.openclip import OpenClipBackbone, transform_for


@pytest.fixture()
def fresh_tiny():
    return load_model("tiny", device="cpu")


def _folder(root, sizes=((40, 48),) * 3, bad: bool = True):
    """Two classes of random images, (height, width) from ``sizes``; one undecodable file if ``bad``."""
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    if bad:
        (root / "dogs" / "broken.png").write_bytes(b"not a png")
    return image_folder(root)


def _normalized(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


# -- the model side -----------------------------------------------------------------------------------------


def test_final_path_equals_dense_features_exactly_on_the_centre_crop(tiny):
    x = torch.randn(3, 3, 32, 32)
    got = dense_tokens(tiny, x)
    assert got.shape == (3, 4, 4, tiny.embed_dim)
    assert torch.equal(got.reshape(3, 16, -1), tiny.dense_features(x))


def test_a_chosen_layer_is_open_clips_normalised_intermediate(tiny):
    x = torch.randn(2, 3, 32, 32)
    visual = tiny.model.visual
    with torch.no_grad():
        out = visual.forward_intermediates(x, indices=[0], normalize_intermediates=True, intermediates_only=True,
                                           output_fmt="NLC")
    expected = _normalized(out["image_intermediates"][0] @ visual.proj)
    got = dense_tokens(tiny, x, DenseSpec(layer=0)).reshape(2, 16, -1)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(got, dense_tokens(tiny, x).reshape(2, 16, -1), atol=1e-3)
    assert torch.equal(dense_tokens(tiny, x, DenseSpec(layer=1)), dense_tokens(tiny, x, DenseSpec(layer=-1)))
    with pytest.raises(CliplabError, match="outside the tower's 2 blocks"):
        dense_tokens(tiny, x, DenseSpec(layer=2))


def _last_block_input(tiny, x):
    visual = tiny.model.visual
    with torch.no_grad():
        return visual.transformer.resblocks[0](visual._embeds(x))


def test_value_path_is_the_last_block_with_each_token_attending_only_to_itself(tiny):
    """MaskCLIP's value path = the ordinary block forward under an attention mask that lets every token see only
    itself (softmax over one key is 1, so attention returns out_proj(v))."""
    x = torch.randn(2, 3, 32, 32)
    visual = tiny.model.visual
    h = _last_block_input(tiny, x)
    n_tokens = h.shape[1]
    self_only = torch.full((n_tokens, n_tokens), float("-inf")).fill_diagonal_(0.0)
    with torch.no_grad():
        out = visual.transformer.resblocks[1](h, attn_mask=self_only)
        expected = _normalized(visual.ln_post(out)[:, 1:] @ visual.proj)
    got = dense_tokens(tiny, x, DenseSpec(path="value")).reshape(2, 16, -1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(got, dense_tokens(tiny, x).reshape(2, 16, -1), atol=1e-2)


def _ln(x, module):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + module.eps) * _np(module.weight) + _np(module.bias)


def _np(t):
    return t.detach().double().numpy()


def _gelu(x):
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


@pytest.mark.parametrize("mlp", [True, False])
def test_value_path_matches_a_hand_written_recomputation(tiny, mlp):
    x = torch.randn(2, 3, 32, 32)
    visual = tiny.model.visual
    block = visual.transformer.resblocks[1]
    h = _np(_last_block_input(tiny, x))
    width = block.attn.embed_dim
    w_v, b_v = _np(block.attn.in_proj_weight)[2 * width:], _np(block.attn.in_proj_bias)[2 * width:]
    v = _ln(h, block.ln_1) @ w_v.T + b_v
    o = v @ _np(block.attn.out_proj.weight).T + _np(block.attn.out_proj.bias)
    if mlp:
        o = h + o
        hidden = _gelu(_ln(o, block.ln_2) @ _np(block.mlp.c_fc.weight).T + _np(block.mlp.c_fc.bias))
        o = o + hidden @ _np(block.mlp.c_proj.weight).T + _np(block.mlp.c_proj.bias)
    feats = _ln(o, visual.ln_post)[:, 1:] @ _np(visual.proj)
    expected = feats / np.linalg.norm(feats, axis=-1, keepdims=True)
    got = dense_tokens(tiny, x, DenseSpec(path="value", value_mlp=mlp)).reshape(2, 16, -1).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_positions_are_resampled_bicubically_with_the_class_position_kept(tiny):
    pos = tiny.model.visual.positional_embedding.detach()
    assert resample_positions(pos, (4, 4), (4, 4)) is pos
    out = resample_positions(pos, (4, 4), (6, 5))
    assert out.shape == (1 + 30, pos.shape[1])
    assert torch.equal(out[0], pos[0])
    grid = pos[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 5), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(out[1:], expected.reshape(30, -1), atol=1e-6, rtol=0)


def test_input_sizes_keep_the_aspect_in_whole_patches():
    patch, window = (8, 8), (32, 32)
    assert input_size(patch, window, DenseSpec(input="aspect"), 48, 40) == (32, 40)  # 40x48 -> 32 x 38.4 -> 40
    assert input_size(patch, window, DenseSpec(input="aspect", resolution=64), 100, 50) == (64, 128)
    assert input_size(patch, window, DenseSpec(input="aspect", resolution=64, max_side=96), 100, 50) == (48, 96)
    assert input_size(patch, window, DenseSpec(input="aspect", resolution=16), 30, 30) == (16, 16)
    # sliding never goes below one window on either side
    assert input_size(patch, window, DenseSpec(input="sliding", resolution=16), 60, 30) == (32, 32)
    assert input_size(patch, window, DenseSpec(input="sliding"), 90, 30) == (32, 96)


def test_aspect_input_of_a_square_image_at_the_model_size_is_the_model_input(tiny):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    aspect = dense_transform(tiny, DenseSpec(input="aspect"))(image)
    model = tiny.preprocess(image)
    torch.testing.assert_close(aspect, model, atol=1e-6, rtol=0)


def test_other_grids_run_with_resampled_positions(fresh_tiny):
    """A 48x40 input runs as a 6x5 grid; it equals the plain model whose positional embedding was replaced by
    the resampled one (the class-token row kept)."""
    x = torch.randn(2, 3, 48, 40)
    got = dense_tokens(fresh_tiny, x, DenseSpec(input="aspect"))
    assert got.shape == (2, 6, 5, fresh_tiny.embed_dim)
    visual = fresh_tiny.model.visual
    with torch.no_grad():
        visual.positional_embedding = torch.nn.Parameter(
            resample_positions(visual.positional_embedding, (4, 4), (6, 5)), requires_grad=False)
        visual.grid_size = (6, 5)
        tokens = visual.transformer(visual._embeds(x))
        expected = _normalized(visual.ln_post(tokens)[:, 1:] @ visual.proj)
    torch.testing.assert_close(got.reshape(2, 30, -1), expected, atol=1e-6, rtol=0)


def test_sliding_windows_average_the_normalised_tokens_of_the_windows_covering_a_patch(tiny):
    x = torch.randn(1, 3, 32, 48)  # windows of 32 px every 16 px: columns 0 and 16
    got = dense_tokens(tiny, x, DenseSpec(input="sliding"))
    assert got.shape == (1, 4, 6, tiny.embed_dim)
    left = dense_tokens(tiny, x[..., :32])[0]
    right = dense_tokens(tiny, x[..., 16:])[0]
    torch.testing.assert_close(got[0, :, :2], left[:, :2], atol=1e-6, rtol=0)
    torch.testing.assert_close(got[0, :, 4:], right[:, 2:], atol=1e-6, rtol=0)
    torch.testing.assert_close(got[0, :, 2:4], _normalized(left[:, 2:] + right[:, :2]), atol=1e-6, rtol=0)
    with pytest.raises(CliplabError, match="not a multiple of the patch size"):
        dense_tokens(tiny, x, DenseSpec(input="sliding", stride=12))


def _resnet_backbone():
    model = CLIP(embed_dim=32, vision_cfg={"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8},
                 text_cfg={"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1})
    open_clip.set_model_preprocess_cfg(model, {"size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3})
    info = BackboneInfo(name="tiny-rn", pretrained=None, source="test", random_weights=True)
    return OpenClipBackbone(model, transform_for(model), open_clip.SimpleTokenizer(context_length=16), info,
                            "test:tiny-rn", "cpu")


def test_a_resnet_tower_raises_one_line_before_reading_any_image(tmp_path):
    backbone = _resnet_backbone()
    data = _folder(tmp_path / "imgs", bad=False)
    data.load_image = lambda index: pytest.fail("no image may be read")
    with pytest.raises(DenseFeaturesUnavailableError) as info:
        embed_dense(backbone, data, tmp_path / "cache", progress=False)
    assert "\n" not in str(info.value) and "ModifiedResNet" in str(info.value)


def test_spec_is_validated():
    with pytest.raises(CliplabError, match="path must be one of final, value"):
        DenseSpec(path="attention")
    with pytest.raises(CliplabError, match="input must be one of"):
        DenseSpec(input="crop")
    with pytest.raises(CliplabError, match="stride must be a positive integer"):
        DenseSpec(input="sliding", stride=0)
    with pytest.raises(CliplabError, match="stride does not apply to input='aspect'"):
        DenseSpec(input="aspect", stride=16)
    with pytest.raises(CliplabError, match="resolution does not apply to input='model'"):
        DenseSpec(resolution=64)


# -- the cached value ---------------------------------------------------------------------------------------


def test_embed_dense_equals_direct_extraction_and_lists_failures(tmp_path, tiny):
    data = _folder(tmp_path / "imgs")
    out = embed_dense(tiny, data, tmp_path / "cache", batch_size=4, num_workers=0, progress=False)
    assert isinstance(out, DenseFeatures)
    assert len(out) + len(out.failures) == len(data) == 7
    assert [item for item, _ in out.failures] == ["dogs/broken.png"] and out.failures[0][1]
    assert out.grid_shape == (4, 4) and out.tokens.shape == (6, 16, tiny.embed_dim)
    images = torch.stack([tiny.preprocess(data.load_image(int(i))) for i in out.indices])
    np.testing.assert_array_equal(out.tokens, tiny.dense_features(images).numpy())
    assert out.grid(2).shape == (4, 4, tiny.embed_dim)
    np.testing.assert_array_equal(out.grid(2).reshape(16, -1), out.tokens[2])
    assert list(out.labels) == [int(data.labels[i]) for i in out.indices]
    assert out.item_ids == [data.item_id(int(i)) for i in out.indices]
    assert not out.tokens.flags.writeable
    assert out.key["path"] == "final" and out.key["layer"] == 1 and out.key["model_id"] == tiny.model_id
    again = embed_dense(tiny, data, tmp_path / "cache", batch_size=4, num_workers=0, progress=False)
    assert again.computed == 0 and again.failures == out.failures  # the broken file is remembered, not retried


def test_warm_rerun_reads_memory_mapped_and_computes_nothing(tmp_path, tiny):
    data = _folder(tmp_path / "imgs", bad=False)
    first = embed_dense(tiny, data, tmp_path / "cache", batch_size=4, num_workers=0, progress=False)
    again = embed_dense(tiny, data, tmp_path / "cache", batch_size=4, num_workers=0, progress=False)
    assert (first.computed, again.computed) == (6, 0)
    assert isinstance(again.tokens, np.memmap) or isinstance(again.tokens.base, np.memmap)
    np.testing.assert_array_equal(first.tokens, again.tokens)
    assert again.cache_key == first.cache_key


def test_the_cache_key_says_what_was_extracted(tiny):
    keys = {spec: dense_cache_key(tiny, spec)[0] for spec in [
        DenseSpec(), DenseSpec(layer=0), DenseSpec(path="value"), DenseSpec(path="value", value_mlp=False),
        DenseSpec(input="aspect"), DenseSpec(input="aspect", resolution=64), DenseSpec(input="sliding"),
        DenseSpec(input="sliding", stride=8)]}
    assert len(set(keys.values())) == len(keys)
    assert dense_cache_key(tiny, DenseSpec(layer=-1))[0] == dense_cache_key(tiny, DenseSpec(layer=1))[0]
    assert dense_cache_key(tiny, DenseSpec(input="sliding", stride=16))[0] == keys[DenseSpec(input="sliding")]
    assert dense_cache_key(load_model("tiny", seed=1))[0] != keys[DenseSpec()]
    key = dense_cache_key(tiny, DenseSpec(input="sliding"))[1]
    assert {key[k] for k in ("model_id", "path", "input", "resolution", "stride", "encoding")} == {
        tiny.model_id, "final", "sliding", 32, 16, "fp32-torch"}


def _count_rows(backbone):
    """A forward hook counting the images entering the patch embedding."""
    seen = []
    handle = backbone.model.visual.conv1.register_forward_hook(lambda module, args, out: seen.append(len(args[0])))
    return seen, handle


def test_a_killed_run_keeps_finished_batches_and_a_rerun_computes_only_the_rest(tmp_path, fresh_tiny):
    data = _folder(tmp_path / "imgs", sizes=((40, 48),) * 5, bad=False)  # 10 items
    load = data.load_image

    def dies_at_seven(index):
        if index == 7:
            raise KeyboardInterrupt
        return load(index)

    data.load_image = dies_at_seven
    seen, handle = _count_rows(fresh_tiny)
    with pytest.raises(KeyboardInterrupt):
        embed_dense(fresh_tiny, data, tmp_path / "cache", batch_size=3, num_workers=0, progress=False)
    assert sum(seen) == 6  # two finished batches of 3; the third died while decoding
    data.load_image = load
    seen.clear()
    out = embed_dense(fresh_tiny, data, tmp_path / "cache", batch_size=3, num_workers=0, progress=False)
    handle.remove()
    assert sum(seen) == 4 and out.computed == 4 and len(out) == 10
    whole = embed_dense(fresh_tiny, data, tmp_path / "fresh-cache", batch_size=10, num_workers=0, progress=False)
    np.testing.assert_array_equal(out.tokens, whole.tokens)


def test_mixed_grids_are_kept_per_item(tmp_path, tiny):
    data = _folder(tmp_path / "imgs", sizes=((40, 48), (32, 64), (64, 32)), bad=False)
    out = embed_dense(tiny, data, tmp_path / "cache", spec=DenseSpec(input="aspect"), batch_size=4,
                      num_workers=0, progress=False)
    assert out.grid_shape is None
    assert sorted(set(out.grids)) == [(4, 5), (4, 8), (8, 4)]
    with pytest.raises(FeatureError, match="different patch grids"):
        _ = out.tokens
    transform = dense_transform(tiny, DenseSpec(input="aspect"))
    for k in range(len(out)):
        image = transform(data.load_image(int(out.indices[k])))
        expected = dense_tokens(tiny, image[None], DenseSpec(input="aspect"))[0]
        np.testing.assert_allclose(out.grid(k), expected.numpy(), atol=1e-6)
    same = out.take([int(i) for i in out.indices if out.grids[list(out.indices).index(i)] == (4, 5)])
    assert same.grid_shape == (4, 5) and same.tokens.shape == (2, 20, tiny.embed_dim)


def test_a_damaged_shard_is_dropped_reported_and_recomputed(tmp_path, tiny):
    data = _folder(tmp_path / "imgs", bad=False)
    first = embed_dense(tiny, data, tmp_path / "cache", batch_size=4, num_workers=0, progress=False)
    prefix = first.cache_key.split("/")[0]
    space = tmp_path / "cache" / f"{prefix}-4x4"
    for view in (space / "views").glob("*"):
        view.unlink()
    shard = sorted((space / "shards").glob("*.npy"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    again = embed_dense(tiny, data, tmp_path / "cache", batch_size=4, num_workers=0, progress=False)
    assert again.repairs and 0 < again.computed < len(data)
    np.testing.assert_array_equal(first.tokens, again.tokens)


def test_take_aligns_with_dataset_indices(tmp_path, tiny):
    data = _folder(tmp_path / "imgs")
    out = embed_dense(tiny, data, tmp_path / "cache", batch_size=4, num_workers=0, progress=False)
    order = [int(i) for i in out.indices][::-1]
    flipped = out.take(order)
    np.testing.assert_array_equal(flipped.tokens, np.asarray(out.tokens)[::-1])
    broken = next(i for i in range(len(data)) if data.item_id(i) == "dogs/broken.png")
    with pytest.raises(FeatureError, match="has no dense features"):
        out.take([broken])


# -- Hugging Face CLIPModel -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    """A small random transformers CLIPModel folder (2 vision blocks, 8 px patches, 32 px input), loaded."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        projection_dim=16,
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf-clip") / "small-clip"
    CLIPModel(config).save_pretrained(str(path))
    return load_model(str(path), device="cpu")


def _hf_head(backbone, hidden):
    return _normalized(backbone.model.visual_projection(backbone.model.vision_model.post_layernorm(hidden[:, 1:])))


def test_hugging_face_final_path_equals_dense_features_and_its_own_position_interpolation(hf_clip):
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(dense_tokens(hf_clip, x).reshape(2, 16, -1), hf_clip.dense_features(x))
    wide = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        hidden = hf_clip.model.vision_model(pixel_values=wide, interpolate_pos_encoding=True).last_hidden_state
    got = dense_tokens(hf_clip, wide, DenseSpec(input="aspect"))
    assert got.shape == (2, 6, 5, 16)
    torch.testing.assert_close(got.reshape(2, 30, -1), _hf_head(hf_clip, hidden), atol=1e-6, rtol=0)


def test_hugging_face_value_path_is_the_last_layer_with_self_only_attention(hf_clip):
    x = torch.randn(2, 3, 32, 32)
    vision = hf_clip.model.vision_model
    with torch.no_grad():
        h = vision.encoder.layers[0](vision.pre_layrnorm(vision.embeddings(x)), None)
        h = h[0] if isinstance(h, tuple) else h
        mask = torch.full((17, 17), float("-inf")).fill_diagonal_(0.0).expand(2, 1, 17, 17)
        out = vision.encoder.layers[1](h, mask)
        out = out[0] if isinstance(out, tuple) else out
        bare = vision.encoder.layers[1].self_attn.out_proj(
            vision.encoder.layers[1].self_attn.v_proj(vision.encoder.layers[1].layer_norm1(h)))
    torch.testing.assert_close(dense_tokens(hf_clip, x, DenseSpec(path="value")).reshape(2, 16, -1),
                               _hf_head(hf_clip, out), atol=1e-5, rtol=0)
    torch.testing.assert_close(dense_tokens(hf_clip, x, DenseSpec(path="value", value_mlp=False)).reshape(2, 16, -1),
                               _hf_head(hf_clip, bare), atol=1e-5, rtol=0)
    torch.testing.assert_close(dense_tokens(hf_clip, x, DenseSpec(layer=0)).reshape(2, 16, -1),
                               _hf_head(hf_clip, h), atol=1e-6, rtol=0)


def test_hugging_face_through_the_cache(tmp_path, hf_clip):
    data = _folder(tmp_path / "imgs", bad=False)
    out = embed_dense(hf_clip, data, tmp_path / "cache", spec=DenseSpec(path="value"), batch_size=4,
                      num_workers=0, progress=False)
    images = torch.stack([hf_clip.preprocess(data.load_image(int(i))) for i in out.indices])
    np.testing.assert_array_equal(out.tokens, dense_tokens(hf_clip, images, DenseSpec(path="value")).reshape(6, 16, -1))
    assert out.key["path"] == "value" and out.key["model_id"] == hf_clip.model_id


def test_batches_another_process_stored_meanwhile_are_not_recomputed(tmp_path, fresh_tiny, monkeypatch):
    import cliplab.features.dense as dense_module

    data = _folder(tmp_path / "imgs", bad=False)
    first = embed_dense(fresh_tiny, data, tmp_path / "cache", batch_size=4, num_workers=0, progress=False)
    lookup = dense_module._Store.lookup
    calls = []

    def stale_first_lookup(self, identities):  # as if another process stored everything after our first look
        calls.append(1)
        return ({}, {}) if len(calls) == 1 else lookup(self, identities)

    monkeypatch.setattr(dense_module._Store, "lookup", stale_first_lookup)
    seen, handle = _count_rows(fresh_tiny)
    again = embed_dense(fresh_tiny, data, tmp_path / "cache", batch_size=4, num_workers=0, progress=False)
    handle.remove()
    assert sum(seen) == 0 and again.computed == 0
    np.testing.assert_array_equal(first.tokens, again.tokens)


def test_a_model_left_in_training_mode_is_run_in_eval_mode_and_left_as_it_was(tiny):
    from open_clip.transformer import PatchDropout

    x = torch.randn(2, 3, 32, 32)
    copy = tiny.derive("dense-test")
    copy.model.visual.patch_dropout = PatchDropout(0.5)  # drops half the patches, in training mode only
    copy.model.train()
    assert torch.equal(dense_tokens(copy, x), dense_tokens(tiny, x))
    assert copy.model.training and copy.model.visual.training


def test_cliplab_cache_verify_covers_the_dense_spaces(tmp_path, tiny):
    from cliplab.features.cache import cache_spaces
    from cliplab.features.cache_check import verify_space

    data = _folder(tmp_path / "imgs", sizes=((40, 48), (32, 64)), bad=False)
    out = embed_dense(tiny, data, tmp_path / "cache", spec=DenseSpec(input="aspect"), num_workers=0, progress=False)
    prefix = out.cache_key.split("/")[0]
    spaces = {space.space: space for space in cache_spaces(tmp_path / "cache")}
    assert set(spaces) == {prefix, f"{prefix}-4x5", f"{prefix}-4x8"}
    assert all(not verify_space(space) for space in spaces.values())
    shard = next((tmp_path / "cache" / f"{prefix}-4x8" / "shards").glob("*.npy"))
    shard.write_bytes(shard.read_bytes()[:-8])
    assert [p.kind for p in verify_space(spaces[f"{prefix}-4x8"])] == ["shard"]
