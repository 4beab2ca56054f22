"""Long text: Long-CLIP's positional stretching and the truncate / chunk / error policies of encode_texts."""

from __future__ import annotations

import warnings

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CustomTextCLIP

from cliplab.errors import TextTooLongError, UnsupportedOperationError
from cliplab.features.text import embed_texts, text_cache
from cliplab.models import load_model
from cliplab.models.backbone import BackboneInfo, TextLengthUnknownWarning, TextTruncatedWarning
from cliplab.models.longtext import merge_longclip_state, stretch_positional_embedding, stretched_positions
from cliplab.models.openclip import OpenClipBackbone, transform_for
from cliplab.models.tiny import TINY_CONFIG, build_tiny_model

LONG = "a small brown dog runs along a wide sandy beach under a pale sky " * 20  # ~280 tokens
SHORT = "a photo of a cat"


def _custom_text_backbone(seed: int = 0) -> OpenClipBackbone:
    """A real open_clip CustomTextCLIP (TextTransformer tower under ``model.text``), small, random weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CustomTextCLIP(**TINY_CONFIG)
    open_clip.set_model_preprocess_cfg(model, open_clip.get_model_preprocess_cfg(build_tiny_model()))
    info = BackboneInfo(name="tiny-custom-text", pretrained=None, source="tiny", random_weights=True)
    return OpenClipBackbone(model.eval(), transform_for(model), open_clip.SimpleTokenizer(context_length=77), info,
                            f"tiny-custom-seed{seed}")


@pytest.fixture(scope="module")
def backbones():
    return {"clip": load_model("tiny", device="cpu"), "custom_text": _custom_text_backbone()}


@pytest.fixture(scope="module", params=["clip", "custom_text"])
def backbone(request, backbones):
    return backbones[request.param]


def _hand_stretch(p: np.ndarray, keep: int = 20) -> np.ndarray:
    """Long-CLIP's loop, written out: 4 rows per learned position after ``keep``, the last extrapolated."""
    length = len(p)
    rows = [p[i] for i in range(keep)]
    for i in range(keep, length - 1):
        rows += [p[i] + j / 4 * (p[i + 1] - p[i]) for j in range(4)]
    rows += [p[-1] + j / 4 * (p[-1] - p[-2]) for j in range(4)]
    return np.stack(rows)


def test_stretched_positions_match_hand_computation():
    p = torch.randn(77, 8, dtype=torch.float64)
    out = stretched_positions(p)
    assert out.shape == (248, 8)
    assert torch.equal(out[:20], p[:20])  # knowledge-preserving: the first 20 rows exactly
    np.testing.assert_allclose(out.numpy(), _hand_stretch(p.numpy()), atol=1e-12)
    assert torch.equal(out[20::4][:57], p[20:])  # every 4th row is a learned position
    # numpy's linear interpolation agrees on the interpolated part
    grid = 20 + np.arange(4 * 56) / 4  # fractional source positions 20, 20.25, ..., 75.75
    interp = np.stack([np.interp(grid, np.arange(77), p[:, c].numpy()) for c in range(8)], axis=1)
    np.testing.assert_allclose(out[20:20 + 4 * 56].numpy(), interp, atol=1e-12)


def test_stretch_backbone(backbone):
    stretched = stretch_positional_embedding(backbone)
    assert backbone.context_length == 77 and stretched.context_length == 248  # the original is untouched
    assert stretched.model_id == backbone.model_id + "+longpos20x4" != backbone.model_id
    assert stretched.tokenizer_id != backbone.tokenizer_id
    assert stretched.tokenize([SHORT]).shape == (1, 248)
    holder = getattr(stretched.model, "text", stretched.model)
    original = getattr(backbone.model, "text", backbone.model)
    assert torch.equal(holder.positional_embedding[:20], original.positional_embedding[:20])
    assert holder.attn_mask.shape == (248, 248)
    assert stretched.info.benchmark[1].endswith("longpos")
    # a 200-token text fits whole: no truncation, no warning, no error
    text = "word " * 198
    assert stretched.text_lengths([text]) == [200]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        emb = stretched.encode_texts([text], long_text="error")
    assert emb.shape == (1, backbone.embed_dim) and torch.isfinite(emb).all()
    # under 20 tokens every position used is unchanged: the same embedding up to float error
    np.testing.assert_allclose(stretched.encode_texts([SHORT]).numpy(), backbone.encode_texts([SHORT]).numpy(),
                               atol=1e-5)
    # a 60-token text uses stretched positions 20..59: its embedding changes
    mid = "word " * 58
    assert (stretched.encode_texts([mid]) - backbone.encode_texts([mid])).abs().max() > 1e-4


def test_load_model_option_and_cache_key(tmp_path):
    plain = load_model("tiny", device="cpu")
    stretched = load_model("tiny", device="cpu", long_text_positions=True, long_text="chunk")
    assert stretched.context_length == 248 and stretched.long_text == "chunk"
    assert stretched.model_id != plain.model_id
    assert text_cache(plain, tmp_path).space != text_cache(stretched, tmp_path).space
    # the policy is part of the text cache key where it changes results; truncate keeps the old key
    assert text_cache(plain, tmp_path, "chunk").space != text_cache(plain, tmp_path).space
    assert text_cache(plain, tmp_path, "truncate").space == text_cache(plain, tmp_path).space


def test_refuses_other_text_towers(tiny):
    fake = stretch_positional_embedding(tiny)
    fake.model = torch.nn.Module()  # neither a CLIP nor a TextTransformer
    fake.model.text = torch.nn.Linear(2, 2)
    with pytest.raises(UnsupportedOperationError, match="tiny.*Linear"):
        stretch_positional_embedding(fake)


def test_longclip_checkpoint_loads_with_248_positions(tmp_path):
    """A Long-CLIP state dict (248 positions + positional_embedding_res) loads into an open_clip arch as is."""
    from safetensors.torch import save_file

    ref = stretch_positional_embedding(load_model("tiny", device="cpu"))
    state = {k: v.clone().contiguous() for k, v in ref.model.state_dict().items()}
    pos = state["positional_embedding"]
    state["positional_embedding_res"] = pos.clone()
    state["positional_embedding"] = torch.cat([pos[:20], torch.randn(228, pos.shape[1])])  # rows >= 20 unused
    assert torch.equal(merge_longclip_state(state)["positional_embedding"], pos)
    path = tmp_path / "longclip.safetensors"
    save_file(state, str(path))
    config = tmp_path / "tiny.json"
    config.write_text(__import__("json").dumps({**TINY_CONFIG, "text_cfg": {**TINY_CONFIG["text_cfg"],
                                                                            "context_length": 248}}))
    loaded = load_model(str(path), config=str(config), device="cpu")
    assert loaded.context_length == 248 and loaded.tokenize([SHORT]).shape == (1, 248)
    np.testing.assert_allclose(loaded.encode_texts([LONG[:600]]).numpy(), ref.encode_texts([LONG[:600]]).numpy(),
                               atol=1e-5)


# -- truncate / chunk / error -----------------------------------------------------------------
def _cut_with_eot(backbone, text: str) -> torch.Tensor:
    """The text's ids cut to the context with the end-of-text token in the last position, built by hand."""
    tok = backbone._tokenizer
    ids = [tok.sot_token_id, *tok.encode(text)][: backbone.context_length - 1] + [tok.eot_token_id]
    return torch.tensor([ids])


def test_truncate_keeps_eot_and_warns_once(backbone):
    texts = [SHORT, LONG, LONG + " again"]
    with pytest.warns(TextTruncatedWarning, match=r"2 of 3 text\(s\) exceed the 77-token context") as record:
        emb = backbone.encode_texts(texts)
    assert len([w for w in record if issubclass(w.category, TextTruncatedWarning)]) == 1
    cut = _cut_with_eot(backbone, LONG)
    assert cut.shape == (1, 77) and cut[0, -1] == backbone._tokenizer.eot_token_id
    expected = F.normalize(backbone.forward_texts(cut).detach(), dim=-1)
    np.testing.assert_allclose(emb[1:2].numpy(), expected.numpy(), atol=1e-6)
    # argmax pooling reads the last position: the EOT token is there, not a word token (torchmetrics 2883)
    assert int(backbone.pack_tokens(backbone._token_sequences([LONG]))[0].argmax()) == 76
    # dropping the EOT instead (a plain cut) gives another embedding: the test would see the bug
    wrong = torch.tensor([[backbone._tokenizer.sot_token_id, *backbone._tokenizer.encode(LONG)][:77]])
    assert (F.normalize(backbone.forward_texts(wrong).detach(), dim=-1) - expected).abs().max() > 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backbone.encode_texts([SHORT, "a dog"])  # nothing long: no warning


def test_chunk_averages_pieces(backbone):
    tok = backbone._tokenizer
    body = tok.encode(LONG)
    emb = backbone.encode_texts([SHORT, LONG], long_text="chunk")
    pieces = [body[i:i + 75] for i in range(0, len(body), 75)]
    assert len(pieces) >= 3
    tokens = torch.zeros((len(pieces), 77), dtype=torch.long)
    for row, piece in enumerate(pieces):
        ids = [tok.sot_token_id, *piece, tok.eot_token_id]
        tokens[row, :len(ids)] = torch.tensor(ids)
    expected = F.normalize(F.normalize(backbone.forward_texts(tokens).detach(), dim=-1).mean(0), dim=-1)
    np.testing.assert_allclose(emb[1].numpy(), expected.numpy(), atol=1e-6)
    np.testing.assert_allclose(emb[0].numpy(), backbone.encode_texts([SHORT])[0].numpy(), atol=1e-6)
    assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)


def test_error_policy_and_bad_policy(backbone):
    with pytest.raises(TextTooLongError, match="1 text\\(s\\) exceed the 77-token context"):
        backbone.encode_texts([SHORT, LONG], long_text="error")
    backbone.encode_texts([SHORT], long_text="error")
    with pytest.raises(ValueError, match="truncate, chunk, error"):
        backbone.encode_texts([SHORT], long_text="drop")


def test_embed_texts_caches_per_policy(tiny, tmp_path):
    with pytest.warns(TextTruncatedWarning):
        truncated = embed_texts(tiny, [LONG], tmp_path)
    chunked = embed_texts(tiny, [LONG], tmp_path, long_text="chunk")
    assert np.abs(truncated - chunked).max() > 1e-4  # not served the truncated embedding from the cache
    np.testing.assert_allclose(chunked, tiny.encode_texts([LONG], "chunk").numpy(), atol=1e-6)


# -- tokenizers that are not open_clip's plain SimpleTokenizer (review P6) --------------------------------------
WORDS = sorted(set((LONG + SHORT + " again").split()))
SPECIAL = {"<pad>": 0, "<unk>": 1, "<bos>": 3, "<eos>": 4}  # eos != 2: transformers pools at the first eos id
HF_CONTEXT = 16


def _hf_tokenizer(template: str | None):
    """A transformers fast tokenizer (word level) adding ``template``'s special tokens ("<bos> $A <eos>", ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {**SPECIAL, **{w: i + 5 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if template:
        tk.post_processor = processors.TemplateProcessing(single=template, special_tokens=[
            (t, SPECIAL[t]) for t in ("<bos>", "<eos>") if t in template])
    kwargs = {"bos_token": "<bos>"} if "<bos>" in (template or "") else {}
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
                                   **kwargs)


def _hf_backbone(template: str | None):
    """An HFClipBackbone over a small random transformers CLIPModel (context 16) and a word-level tokenizer."""
    from transformers import CLIPConfig, CLIPModel

    from cliplab.models.hf import HFClipBackbone

    config = CLIPConfig(
        text_config={"vocab_size": len(WORDS) + 5, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": HF_CONTEXT, "bos_token_id": 3,
                     "eos_token_id": 4, "pad_token_id": 0},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 16},
        projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(config).eval()
    info = BackboneInfo(name="tiny-hf", pretrained=None, source="hf", random_weights=True)
    return HFClipBackbone(model, lambda image: torch.zeros(3, 32, 32), _hf_tokenizer(template), info,
                          f"tiny-hf-{template}")


def _ids(text: str) -> list[int]:
    return [SPECIAL["<unk>"] if w not in WORDS else WORDS.index(w) + 5 for w in text.split()]


def _embed_ids(backbone, ids: list[int]) -> torch.Tensor:
    tokens = torch.full((1, backbone.context_length), SPECIAL["<pad>"], dtype=torch.long)
    tokens[0, :len(ids)] = torch.tensor(ids)
    return F.normalize(backbone.forward_texts(tokens).detach(), dim=-1)[0]


@pytest.mark.parametrize("template", ["<bos> $A <eos>", "$A <eos>"])  # CLIP-like; SigLIP / T5-like (no start token)
def test_hf_clip_tower_truncate_error_chunk(template):
    backbone = _hf_backbone(template)
    start = [SPECIAL["<bos>"]] if "<bos>" in template else []
    body = _ids(LONG)
    assert backbone.text_lengths([SHORT, LONG]) == [len(_ids(SHORT)) + len(start) + 1, len(body) + len(start) + 1]
    with pytest.warns(TextTruncatedWarning, match=r"1 of 2 text\(s\) exceed the 16-token context"):
        emb = backbone.encode_texts([SHORT, LONG])
    cut = start + body[: HF_CONTEXT - len(start) - 1] + [SPECIAL["<eos>"]]  # the text cut, its EOS kept last
    np.testing.assert_allclose(emb[1].numpy(), _embed_ids(backbone, cut).numpy(), atol=1e-6)
    np.testing.assert_allclose(emb[0].numpy(), _embed_ids(backbone, start + _ids(SHORT) + [4]).numpy(), atol=1e-6)
    # the model pools at the first EOS: a cut that dropped it would give another embedding
    dropped = start + body[: HF_CONTEXT - len(start)]
    assert (_embed_ids(backbone, dropped) - emb[1]).abs().max() > 1e-3
    with pytest.raises(TextTooLongError, match="exceed the 16-token context"):
        backbone.encode_texts([SHORT, LONG], long_text="error")
    if start:  # start and end tokens known: chunks of 14 words, each <bos> ... <eos>
        chunked = backbone.encode_texts([LONG], long_text="chunk")[0]
        pieces = [F.normalize(_embed_ids(backbone, start + body[i:i + 14] + [4]), dim=-1)
                  for i in range(0, len(body), 14)]
        np.testing.assert_allclose(chunked.numpy(), F.normalize(torch.stack(pieces).mean(0), dim=0).numpy(),
                                   atol=1e-5)
    else:
        with pytest.raises(UnsupportedOperationError, match=f"chunk.*{type(backbone._tokenizer).__name__}"):
            backbone.encode_texts([LONG], long_text="chunk")


def test_hf_truncation_that_loses_the_pooled_eos_is_refused():
    """A tokenizer adding no EOS: a cut text would be pooled at a word (torchmetrics 2883): refused, not wrong."""
    backbone = _hf_backbone(None)
    assert backbone.text_lengths([LONG]) == [len(_ids(LONG))]
    with pytest.raises(UnsupportedOperationError, match="end-of-text token 4"):
        backbone.encode_texts([LONG])


def test_open_clip_hf_tokenizer_lengths(tmp_path, tiny):
    """open_clip's HFTokenizer (SigLIP's kind): lengths from its transformers tokenizer; last-token pooling."""
    import copy

    from open_clip.tokenizer import HFTokenizer

    _hf_tokenizer("$A <eos>").save_pretrained(str(tmp_path / "tok"))
    backbone = copy.copy(tiny)
    backbone.model = copy.deepcopy(tiny.model)
    backbone.model.text_pool_type = "last"  # SigLIP pools the last position
    backbone._tokenizer = HFTokenizer(str(tmp_path / "tok"), context_length=77, clean="whitespace")
    body = _ids(LONG)
    assert backbone.text_lengths([SHORT, LONG]) == [len(_ids(SHORT)) + 1, len(body) + 1]
    with pytest.raises(TextTooLongError, match="1 text\\(s\\) exceed the 77-token context"):
        backbone.encode_texts([SHORT, LONG], long_text="error")
    with pytest.warns(TextTruncatedWarning, match="1 of 2"):
        emb = backbone.encode_texts([SHORT, LONG])
    expected = F.normalize(backbone.forward_texts(torch.tensor([body[:76] + [4]])).detach(), dim=-1)
    np.testing.assert_allclose(emb[1:].numpy(), expected.numpy(), atol=1e-6)
    with pytest.raises(UnsupportedOperationError, match="chunk.*HFTokenizer"):
        backbone.encode_texts([LONG], long_text="chunk")


class _OpaqueTokenizer:
    """A tokenizer cliplab cannot inspect: only ``__call__`` and ``context_length``."""

    def __init__(self):
        self.inner = open_clip.SimpleTokenizer(context_length=77)
        self.context_length = 77

    def __call__(self, texts):
        return self.inner(texts)


def test_unknown_lengths_error_refuses_and_truncate_warns_once(tiny):
    import copy

    backbone = copy.copy(tiny)
    backbone._tokenizer = _OpaqueTokenizer()
    backbone._warned_unknown_lengths = False
    assert backbone.text_lengths([LONG]) is None
    with pytest.raises(UnsupportedOperationError, match="long_text='error'.*_OpaqueTokenizer"):
        backbone.encode_texts([SHORT], long_text="error")
    with pytest.warns(TextLengthUnknownWarning, match="_OpaqueTokenizer"):
        emb = backbone.encode_texts([SHORT, LONG])
    with pytest.warns(TextTruncatedWarning):
        reference = tiny.encode_texts([SHORT, LONG])
    np.testing.assert_allclose(emb.numpy(), reference.numpy(), atol=1e-6)  # the tokenizer's own cut
    with warnings.catch_warnings():
        warnings.simplefilter("error", TextLengthUnknownWarning)
        backbone.encode_texts([LONG])  # once per backbone


def test_retrieval_record_counts_long_captions_of_hf_tokenizers():
    backbone = _hf_backbone("$A <eos>")
    lengths = backbone.text_lengths([SHORT, LONG, LONG])
    assert lengths is not None and sum(n > backbone.context_length for n in lengths) == 2


def test_fitting_texts_are_tokenized_once(tiny, monkeypatch):
    calls = []
    original = type(tiny).tokenize
    monkeypatch.setattr(type(tiny), "tokenize", lambda self, texts: calls.append(len(texts)) or original(self, texts))
    emb = tiny.encode_texts([SHORT, "a dog"])
    assert calls == []  # the ids measured for the length check are packed and reused
    tokens = original(tiny, [SHORT, "a dog"])
    np.testing.assert_allclose(emb.numpy(), F.normalize(tiny.forward_texts(tokens).detach(), dim=-1).numpy(),
                               atol=1e-6)


def test_cli_long_positions_option(tmp_path):
    """``cliplab embed --long-positions``: the stretched model embeds (its id in the shards), and the Ray actors'
    ``model_spec`` carries the option so they load the same model."""
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from cliplab.cli.app import app
    from cliplab.cli.common import RunOptions
    from cliplab.cli.embed import model_spec

    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (40, 30), (60 * i, 100, 200)).save(tmp_path / "imgs" / "cat" / f"{i}.png")
    base = ["embed", str(tmp_path / "imgs"), "--model", "tiny", "-q", "--workers", "0",
            "--cache-dir", str(tmp_path / "cache")]
    result = CliRunner().invoke(app, [*base, "--long-positions", "--shards", str(tmp_path / "long")])
    assert result.exit_code == 0, result.output
    plain = CliRunner().invoke(app, [*base, "--shards", str(tmp_path / "plain")])
    assert plain.exit_code == 0, plain.output
    long_id = json.loads((tmp_path / "long" / "shards.json").read_text())["model_id"]
    plain_id = json.loads((tmp_path / "plain" / "shards.json").read_text())["model_id"]
    assert long_id == plain_id + "+longpos20x4"
    spec = model_spec(RunOptions(model="tiny", long_text_positions=True))
    assert spec["long_text_positions"] is True
    assert load_model(**{**spec, "device": "cpu"}).model_id == long_id
