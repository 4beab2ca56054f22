"""Encoder access for training methods: towers block by block, deep prompts, reparametrisation, derive() safety."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CustomTextCLIP

from cliplab.errors import CliplabError, TextTooLongError, UnsupportedOperationError
from cliplab.models import BackboneInfo, load_model
from cliplab.models.openclip import OpenClipBackbone, transform_for
from cliplab.models.reparam import IdentityWeight, identity, singular_values

TEXTS = ["a photo of a cat", "a diagram of a bridge at night", "x"]
EXACT = 1e-6
VISION = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32}


def _text_cfg(**overrides) -> dict:
    return {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3, **overrides}


def _wrap(model: torch.nn.Module, name: str) -> OpenClipBackbone:
    open_clip.set_model_preprocess_cfg(model, {"size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3})
    context_length = getattr(model, "context_length", None) or model.text.context_length
    info = BackboneInfo(name=name, pretrained=None, source="test", random_weights=True)
    tokenizer = open_clip.SimpleTokenizer(context_length=context_length)
    return OpenClipBackbone(model.eval(), transform_for(model), tokenizer, info, f"test:{name}", "cpu")


def _seeded(cls, vision=VISION, **text_overrides) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return cls(embed_dim=32, vision_cfg=vision, text_cfg=_text_cfg(**text_overrides))


def _pad_masked(model):
    model.text.use_pad_mask = True
    return model


TOWERS = {  # open_clip text towers with each pooling rule and mask
    "clip-eos": lambda: _seeded(CLIP, pool_type="eos", eos_id=49407),
    "clip-last": lambda: _seeded(CLIP, pool_type="last"),
    "custom-bidirectional-pad-mask": lambda: _pad_masked(_seeded(CustomTextCLIP, pool_type="last",
                                                                 no_causal_mask=True, pad_id=0)),
    "custom-cls-token": lambda: _seeded(CustomTextCLIP, embed_cls=True, pad_id=0),
}


@pytest.fixture()
def tiny():
    return load_model("tiny", device="cpu")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A small random transformers CLIPModel folder (no tokenizer files: CLIP's BPE is used)."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        projection_dim=16,
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                     "num_attention_heads": 2, "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf-clip") / "small-clip"
    CLIPModel(config).save_pretrained(str(path))
    return path


def _images(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def _assert_tower_paths_are_exact(backbone, *, image: bool = True) -> None:
    """No prompts, a no-op hook, the empty prompt list: the block-by-block run equals the model's own forward."""
    tokens = backbone.tokenize(TEXTS)
    seen = []
    with torch.no_grad():
        plain_t = backbone.forward_texts(tokens)
        assert _max_diff(backbone.forward_texts(tokens, prompts=[]), plain_t) <= EXACT
        assert _max_diff(backbone.forward_texts(tokens, hook=lambda j, x: seen.append(j)), plain_t) <= EXACT
        assert seen == list(range(backbone.text_tower().depth))
        embeddings = backbone.token_embeddings(tokens)
        assert _max_diff(backbone.forward_texts(tokens, embeddings=embeddings, prompts=[]), plain_t) <= EXACT
        assert _max_diff(backbone.forward_text_embeddings(embeddings, tokens), plain_t) <= EXACT
        assert _max_diff(backbone.encode_texts(TEXTS), plain_t) <= 1e-5
        if image:
            images = _images()
            plain_i = backbone.forward_images(images)
            assert _max_diff(backbone.forward_images(images, prompts=[]), plain_i) <= EXACT
            assert _max_diff(backbone.forward_images(images, hook=lambda j, x: None), plain_i) <= EXACT


def _identity_reparametrised(backbone):
    derived = backbone.derive("id", trainable=False)
    names = derived.reparametrize(identity, targets=("linear", "attention", "projection"))
    assert names and all(isinstance(n, str) for n in names)
    return derived, names


# -- exactness -------------------------------------------------------------------------------------------
def test_tower_runs_equal_the_plain_forward_tiny(tiny):
    _assert_tower_paths_are_exact(tiny)


@pytest.mark.parametrize("kind", sorted(TOWERS))
def test_text_tower_runs_equal_the_plain_forward_for_every_open_clip_pooling(kind):
    _assert_tower_paths_are_exact(_wrap(TOWERS[kind](), kind), image=False)


def test_tower_runs_equal_the_plain_forward_hugging_face(hf_dir):
    _assert_tower_paths_are_exact(load_model(str(hf_dir), device="cpu"))


def test_identity_reparametrisation_is_exact_and_covers_every_projection(tiny, hf_dir):
    for backbone in (tiny, load_model(str(hf_dir), device="cpu")):
        images, tokens = _images(), backbone.tokenize(TEXTS)
        with torch.no_grad():
            plain = backbone.forward_images(images), backbone.forward_texts(tokens)
        derived, names = _identity_reparametrised(backbone)
        with torch.no_grad():
            assert _max_diff(derived.forward_images(images), plain[0]) <= EXACT
            assert _max_diff(derived.forward_texts(tokens), plain[1]) <= EXACT
        _assert_tower_paths_are_exact(derived)
        # every nn.Linear of the towers and every packed attention input projection is parametrised
        linears = {f"{n}.weight" for n, m in derived.model.named_modules() if isinstance(m, torch.nn.Linear)}
        assert linears and linears <= set(names)
        packed = {f"{n}.in_proj_weight" for n, m in derived.model.named_modules()
                  if isinstance(m, torch.nn.MultiheadAttention)}
        assert packed <= set(names)
        assert set(derived.reparametrised()) == set(names)
    assert any(n.endswith("attn.in_proj_weight") for n in _identity_reparametrised(tiny)[1])
    assert {"visual.proj", "text_projection"} <= set(_identity_reparametrised(tiny)[1])


def test_open_clip_custom_attention_blocks_are_exact_and_reparametrised():
    """open_clip's own ``Attention`` (custom blocks: q/k norm) keeps ``in_proj_weight`` as a bare parameter."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIP(embed_dim=32, vision_cfg={**VISION, "block_type": "custom", "qk_norm": True},
                     text_cfg=_text_cfg(block_type="custom"))
    backbone = _wrap(model, "custom-attention")
    _assert_tower_paths_are_exact(backbone)
    derived, names = _identity_reparametrised(backbone)
    blocks = [derived.model.visual.transformer.resblocks[0], derived.model.transformer.resblocks[0]]
    assert all(type(b.attn).__name__.endswith("Attention") and not isinstance(b.attn, torch.nn.MultiheadAttention)
               for b in blocks)
    assert {"visual.transformer.resblocks.0.attn.in_proj_weight", "transformer.resblocks.0.attn.in_proj_weight"} \
        <= set(names)
    _assert_tower_paths_are_exact(derived)
    trained = backbone.derive("svd", trainable=False)
    trained.reparametrize(singular_values)
    _step(trained, [p for p in trained.model.parameters() if p.requires_grad])
    s = trained.model.visual.transformer.resblocks[0].attn.parametrizations.in_proj_weight[0].s
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_singular_value_parametrisation_reconstructs_the_weight_and_merges(tiny):
    images = _images()
    with torch.no_grad():
        plain = tiny.forward_images(images)
    derived = tiny.derive("svd", trainable=False)
    derived.reparametrize(singular_values)
    attn = derived.model.visual.transformer.resblocks[0].attn
    svd = attn.parametrizations.in_proj_weight[0]
    stored = attn.parametrizations.in_proj_weight.original
    assert svd.s.shape == (min(stored.shape),) and svd.u.shape == (stored.shape[0], min(stored.shape))
    torch.testing.assert_close(attn.in_proj_weight, stored, atol=1e-6, rtol=0)  # U diag(s) V^T = W at the start
    with torch.no_grad():
        assert _max_diff(derived.forward_images(images), plain) <= 1e-5
        svd.s.mul_(2.0)  # doubling every singular value doubles the weight
    torch.testing.assert_close(attn.in_proj_weight, 2 * stored, atol=1e-5, rtol=0)
    with torch.no_grad():
        moved = derived.forward_images(images)
    merged = derived.merge_reparametrisations()
    assert merged and derived.reparametrised() == []
    assert isinstance(derived.model.visual.transformer.resblocks[0].attn.in_proj_weight, torch.nn.Parameter)
    with torch.no_grad():
        assert _max_diff(derived.forward_images(images), moved) <= 1e-6


# -- where the tokens go ---------------------------------------------------------------------------------
def _maple_vision_by_hand(visual, images, prompts):
    """MaPLe's vision side written out: tokens appended after the patches before ln_pre, the last p tokens
    replaced by prompts[j] before block j, the class token pooled (``clip/model.py`` of the MaPLe repository)."""
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding
    p = prompts[0].shape[0]
    x = torch.cat([x, prompts[0].expand(x.shape[0], -1, -1)], dim=1)
    x = visual.ln_pre(x)
    for j, block in enumerate(visual.transformer.resblocks):
        if 0 < j < len(prompts):
            x = torch.cat([x[:, :-p], prompts[j].expand(x.shape[0], -1, -1)], dim=1)
        x = block(x)
    return visual.ln_post(x[:, 0]) @ visual.proj


def _coop_text_by_hand(model, tokens_with_placeholders, prompts):
    """CoOp/MaPLe's text side written out: placeholder words' embeddings replaced by the context, positions
    1..p replaced by prompts[j] before block j, pooled at the end-of-text token of the placeholder text."""
    x = model.token_embedding(tokens_with_placeholders)
    p = prompts[0].shape[0]
    x = torch.cat([x[:, :1], prompts[0].expand(x.shape[0], -1, -1), x[:, 1 + p:]], dim=1)
    x = x + model.positional_embedding
    for j, block in enumerate(model.transformer.resblocks):
        if 0 < j < len(prompts):
            x = torch.cat([x[:, :1], prompts[j].expand(x.shape[0], -1, -1), x[:, 1 + p:]], dim=1)
        x = block(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    return x[torch.arange(x.shape[0]), tokens_with_placeholders.argmax(dim=-1)] @ model.text_projection


@pytest.mark.parametrize("depth", [1, 2])
def test_deep_vision_prompts_match_maple_written_out(tiny, depth):
    torch.manual_seed(3)
    prompts = [torch.randn(3, 64) for _ in range(depth)]
    images = _images()
    with torch.no_grad():
        got = tiny.forward_images(images, prompts=prompts, normalize=False)
        want = _maple_vision_by_hand(tiny.model.visual, images, prompts)
        plain = tiny.forward_images(images, normalize=False)
    assert _max_diff(got, want) <= 1e-5
    assert _max_diff(got, plain) > 1e-3  # the prompts do change the output


def test_deep_vision_prompts_are_replaced_not_accumulated(tiny):
    """With J=2 on a 2-block tower, block 0's outputs at the prompt positions are discarded: the result does
    not depend on them, which a hook that rewrites those positions before block 1 shows."""
    torch.manual_seed(4)
    prompts = [torch.randn(2, 64), torch.randn(2, 64)]
    images = _images()
    shapes = []

    def scramble(j, x):
        shapes.append((j, tuple(x.shape)))
        if j == 1:
            x = x.clone()
            x[:, 1:3] = 1000.0  # the hook sees block 0's prompt outputs: replaced by prompts[1] first
        return x

    with torch.no_grad():
        base = tiny.forward_images(images, prompts=prompts)
        # the hook runs after the replacement: rewriting the positions then changes the output
        assert _max_diff(tiny.forward_images(images, prompts=prompts, hook=scramble), base) > 1e-3
    grid = (32 // 8) ** 2
    assert shapes == [(0, (2, 1 + 2 + grid, 64)), (1, (2, 1 + 2 + grid, 64))]

    captured = {}

    def keep(j, x):
        captured[j] = x.detach().clone()

    with torch.no_grad():
        tiny.forward_images(images, prompts=prompts, hook=keep)
    torch.testing.assert_close(captured[1][:, 1:3], prompts[1].expand(2, -1, -1))


def test_per_item_prompts_equal_shared_ones_item_by_item(tiny):
    torch.manual_seed(5)
    per_item = [torch.randn(2, 4, 64), torch.randn(2, 4, 64)]
    images = _images()
    with torch.no_grad():
        both = tiny.forward_images(images, prompts=per_item)
        for i in range(2):
            one = tiny.forward_images(images[i:i + 1], prompts=[p[i] for p in per_item])
            assert _max_diff(both[i:i + 1], one) <= 1e-5


@pytest.mark.parametrize("depth", [1, 2])
def test_text_context_after_the_start_token_matches_coop_placeholders(tiny, depth):
    torch.manual_seed(6)
    p = 4
    prompts = [0.1 * torch.randn(p, 64) for _ in range(depth)]
    names = ["cat.", "traffic light."]
    plain_tokens = tiny.tokenize(names)
    placeholder_tokens = tiny.tokenize([" ".join(["X"] * p) + " " + name for name in names])
    with torch.no_grad():
        got = tiny.forward_texts(plain_tokens, prompts=prompts, normalize=False)
        want = _coop_text_by_hand(tiny.model, placeholder_tokens, prompts)
    assert _max_diff(got, want) <= 1e-5
    # the pooled position moved with the text: pooling the unshifted end-of-text position would differ
    seen = {}
    with torch.no_grad():
        tiny.forward_texts(plain_tokens, prompts=prompts, hook=lambda j, x: seen.setdefault(j, x.clone()))
    torch.testing.assert_close(seen[0][:, 1:1 + p] - tiny.model.positional_embedding[1:1 + p],
                               prompts[0].expand(2, -1, -1), atol=1e-6, rtol=0)


def test_text_context_in_hugging_face_matches_placeholders(hf_dir):
    backbone = load_model(str(hf_dir), device="cpu")
    torch.manual_seed(7)
    p, width = 3, backbone.text_tower().width
    prompts = [0.1 * torch.randn(p, width), 0.1 * torch.randn(p, width)]
    plain_tokens = backbone.tokenize(["cat.", "a red bus."])
    placeholder_tokens = backbone.tokenize(["X X X cat.", "X X X a red bus."])
    with torch.no_grad():
        got = backbone.forward_texts(plain_tokens, prompts=prompts)

        def swap(j, x):  # the placeholder run with its context positions overwritten like the prompts
            if j >= len(prompts):
                return None
            x = x.clone()
            x[:, 1:1 + p] = prompts[j] + (backbone.model.text_model.embeddings.position_embedding.weight[1:1 + p]
                                          if j == 0 else 0)
            return x

        want = backbone.forward_texts(placeholder_tokens, hook=swap)
    assert _max_diff(got, want) <= 1e-5


@pytest.mark.parametrize("kind", sorted(TOWERS))
def test_text_context_keeps_the_pooled_token_for_every_open_clip_pooling(kind):
    """Inserting p context tokens equals writing them over p placeholder words (each pooling rule and mask)."""
    backbone = _wrap(TOWERS[kind](), kind)
    torch.manual_seed(8)
    p, width = 2, backbone.text_tower().width
    prompts = [0.1 * torch.randn(p, width), 0.1 * torch.randn(p, width)]
    tower = backbone.text_tower()
    holder = tower.holder
    plain_tokens = backbone.tokenize(["cat.", "a red bus."])
    placeholder_tokens = backbone.tokenize(["X X cat.", "X X a red bus."])

    def swap(j, x):
        if j >= len(prompts):
            return None
        x = x.clone()
        x[:, 1:1 + p] = prompts[j] + (holder.positional_embedding[1:1 + p] if j == 0 else 0)
        return x

    with torch.no_grad():
        got = backbone.forward_texts(plain_tokens, prompts=prompts)
        want = backbone.forward_texts(placeholder_tokens, hook=swap)
    if kind == "clip-last":  # 'last' pools position L-1 (padding), which no placeholder run matches: just run
        assert got.shape == want.shape
    else:
        assert _max_diff(got, want) <= 1e-5


def test_context_initialised_from_words_reproduces_the_hand_written_prompt(tiny, hf_dir):
    """CoOp's init: the context vectors of "a photo of a" inserted before "cat." give "a photo of a cat."."""
    for backbone in (tiny, load_model(str(hf_dir), device="cpu")):
        context = backbone.context_embeddings("a photo of a")
        assert context.shape == (4, backbone.text_tower().width) and not context.requires_grad
        with torch.no_grad():
            got = backbone.forward_texts(backbone.tokenize(["cat.", "dog."]), prompts=[context])
            want = backbone.forward_texts(backbone.tokenize(["a photo of a cat.", "a photo of a dog."]))
        assert _max_diff(got, want) <= 1e-5


def test_a_text_without_room_for_the_context_is_refused(tiny):
    tokens = tiny.tokenize([" ".join(["word"] * 73)])  # 75 tokens of 77
    with pytest.raises(TextTooLongError, match="no room for 4 context tokens"):
        tiny.forward_texts(tokens, prompts=[torch.zeros(4, 64)])
    tiny.forward_texts(tokens, prompts=[torch.zeros(1, 64)])  # one still fits


def test_malformed_prompts_are_refused_in_one_line(tiny):
    tokens = tiny.tokenize(["cat"])
    with pytest.raises(ValueError, match=r"expected \(p, 64\)"):
        tiny.forward_texts(tokens, prompts=[torch.zeros(2, 63)])
    with pytest.raises(ValueError, match="same number"):
        tiny.forward_images(_images(1), prompts=[torch.zeros(2, 64), torch.zeros(3, 64)])
    with pytest.raises(ValueError, match="2 blocks"):
        tiny.forward_images(_images(1), prompts=[torch.zeros(2, 64)] * 3)
    with pytest.raises(ValueError, match="sequence of tensors"):
        tiny.forward_images(_images(1), prompts=torch.zeros(2, 64))


def test_resnet_towers_refuse_prompts_naming_what_is_supported_but_reparametrise():
    vision = {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8}
    backbone = _wrap(_seeded(CLIP, vision=vision), "tiny-resnet")
    supported = "ModifiedResNet.*supported: open_clip VisionTransformer"
    with pytest.raises(UnsupportedOperationError, match=supported) as err:
        backbone.forward_images(_images(1), prompts=[torch.zeros(1, 8)])
    assert "\n" not in str(err.value)
    images = _images()
    with torch.no_grad():
        plain = backbone.forward_images(images)
    derived = backbone.derive("id", trainable=False)
    names = derived.reparametrize(identity, towers=("image",))
    assert {f"visual.attnpool.{p}_proj.weight" for p in "qkvc"} <= set(names)
    with torch.no_grad():
        assert _max_diff(derived.forward_images(images), plain) <= EXACT


# -- training: what receives gradients -------------------------------------------------------------------
def _step(backbone, params, *, prompts_i=None, prompts_t=None):
    optimizer = torch.optim.SGD(params, lr=0.5)
    images = backbone.forward_images(_images(4), prompts=prompts_i)
    texts = backbone.forward_texts(backbone.tokenize(["cat", "dog"]), prompts=prompts_t)
    loss = F.cross_entropy(20 * images @ texts.T, torch.tensor([0, 1, 0, 1]))
    loss.backward()
    optimizer.step()


def test_singular_values_alone_train_after_a_step(tiny):
    derived = tiny.derive("svd", trainable=True)
    derived.reparametrize(singular_values)
    trainable = {n: p for n, p in derived.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".s") for n in trainable)
    before = {n: p.detach().clone() for n, p in derived.model.named_parameters()}
    first_id = derived.model_id
    _step(derived, list(trainable.values()))
    for name, param in derived.model.named_parameters():
        if name in trainable:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None and torch.equal(param, before[name]), name
    assert any(not torch.equal(trainable[n], before[n]) for n in trainable)
    assert derived.model_id != first_id  # the id follows the singular values
    assert not any(p.requires_grad or p.grad is not None for p in tiny.model.parameters())


def test_explicit_and_attached_prompts_train_and_nothing_else(tiny, hf_dir):
    for backbone in (tiny, load_model(str(hf_dir), device="cpu")):
        wi, wt = backbone.image_tower().width, backbone.text_tower().width
        image_prompts = [torch.nn.Parameter(0.02 * torch.randn(2, wi)) for _ in range(2)]
        text_prompts = [torch.nn.Parameter(0.02 * torch.randn(3, wt)) for _ in range(2)]
        before = [p.detach().clone() for p in image_prompts + text_prompts]
        _step(backbone, image_prompts + text_prompts, prompts_i=image_prompts, prompts_t=text_prompts)
        assert all(not torch.equal(p, b) for p, b in zip(image_prompts + text_prompts, before))
        assert all(p.grad is None for p in backbone.model.parameters())

        derived = backbone.derive("vpt", trainable=False).set_prompts(image=[torch.zeros(2, wi)] * 2)
        attached = derived.attached_prompts("image")
        assert len(attached) == 2 and all(p.requires_grad for p in attached)
        first_id = derived.model_id
        _step(derived, attached)
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in attached)
        assert all(p.grad is None for n, p in derived.model.named_parameters() if "cliplab_prompts" not in n)
        assert derived.model_id != first_id


def test_attached_prompts_are_what_encode_images_and_texts_use(tiny):
    torch.manual_seed(9)
    image_prompts, text_prompts = [torch.randn(2, 64)] * 2, [0.1 * torch.randn(3, 64)]
    derived = tiny.derive("maple", trainable=False).set_prompts(image=image_prompts, text=text_prompts)
    images, tokens = _images(), tiny.tokenize(TEXTS)
    with torch.no_grad():
        want_i = tiny.forward_images(images, prompts=image_prompts)
        want_t = tiny.forward_texts(tokens, prompts=text_prompts)
        assert _max_diff(derived.encode_images(images), want_i) <= 1e-5
        assert _max_diff(derived.encode_texts(TEXTS), want_t) <= 1e-5
        assert _max_diff(derived.forward_text_embeddings(tiny.token_embeddings(tokens), tokens), want_t) <= 1e-5
        assert _max_diff(derived.forward_images(images, prompts=[]), tiny.forward_images(images)) <= EXACT
    ids = {derived.model_id}
    derived.set_prompts(text=[])
    assert derived.attached_prompts("text") == [] and derived.model_id not in ids
    with torch.no_grad():
        assert _max_diff(derived.encode_texts(TEXTS), tiny.encode_texts(TEXTS)) <= 1e-6


# -- derive() safety -------------------------------------------------------------------------------------
def test_changing_a_shared_backbone_is_refused_in_one_line(tiny):
    for call in (lambda: tiny.reparametrize(identity), lambda: tiny.set_prompts(image=[torch.zeros(1, 64)]),
                 lambda: tiny.merge_reparametrisations()):
        with pytest.raises(UnsupportedOperationError, match=r"derive\(tag\)") as err:
            call()
        assert "\n" not in str(err.value) and isinstance(err.value, CliplabError)
    assert tiny.reparametrised() == [] and tiny.attached_prompts("image") == []


def test_training_a_shared_backbone_in_place_is_loud(tiny):
    tiny.model.visual.proj.requires_grad_(True)  # the trap: trainable weights under a fixed model_id
    with pytest.raises(UnsupportedOperationError, match="shared backbone require grad"):
        tiny.forward_images(_images(1))
    with pytest.raises(UnsupportedOperationError, match="derive"):
        copy.deepcopy(tiny)
    with torch.no_grad():  # inference stays possible
        tiny.forward_images(_images(1))


def test_deepcopy_of_a_derived_backbone_is_a_real_copy(tiny):
    derived = tiny.derive("svd", trainable=False).set_prompts(image=[torch.randn(2, 64)])
    derived.reparametrize(singular_values, towers=("text",))
    twin = copy.deepcopy(derived)
    assert twin is not derived and twin.model is not derived.model and twin.engine is not derived.engine
    assert twin.model_id == derived.model_id and type(twin) is type(derived)
    assert twin.reparametrised() == derived.reparametrised()
    with torch.no_grad():
        assert torch.equal(twin.encode_images(_images()), derived.encode_images(_images()))
        twin.attached_prompts("image")[0].add_(1.0)
        twin.model.transformer.resblocks[0].mlp.c_fc.parametrizations.weight[0].s.mul_(0.5)
    assert twin.model_id != derived.model_id
    assert not torch.equal(twin.attached_prompts("image")[0], derived.attached_prompts("image")[0])


def test_sklearn_clone_of_a_head_keeps_the_shared_backbone_and_copies_a_derived_one(tiny):
    from sklearn.base import clone

    from cliplab.heads.registry import create_head

    head = create_head("zeroshot", backbone=tiny, class_names=["cat", "dog"])
    assert clone(head).backbone is tiny
    derived = tiny.derive("ft", trainable=False)
    other = clone(create_head("zeroshot", backbone=derived, class_names=["cat", "dog"]))
    assert other.backbone is not derived and other.backbone.model_id == derived.model_id


def test_identity_weight_module_is_the_identity():
    weight = torch.randn(3, 4)
    assert IdentityWeight()(weight) is weight
