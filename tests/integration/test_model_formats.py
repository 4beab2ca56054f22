"""``load_model`` on every weights format it claims to read, with a real ViT-B/32 (random weights).

One seeded ViT-B-32 (GELU) is saved once per format into a module-scoped folder; every loaded
backbone must reproduce the in-memory reference model's normalised embeddings. A seeded
ViT-B-32-quickgelu plays OpenAI's role (TorchScript archive and plain OpenAI-layout state dict).
"""

from __future__ import annotations

import collections
import json
import os
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from _hf_convert import to_hf_clip
from open_clip.model import CLIP
from PIL import Image
from safetensors.torch import save_file

from cliplab.errors import ModelLoadError
from cliplab.models import load_model

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning"),
]

ARCH = "ViT-B-32"
SEED = 1234
TEXTS = ["a photo of a cat", "a diagram of a bridge at night", "x"]
ATOL = 1e-5
HF_ATOL = 1e-4
# GELU vs QuickGELU on the same random ViT-B-32 weights moves image embeddings by ~1e-3 (max abs);
# matching loads agree to ~1e-7. Anything above this gap means "a different activation ran".
ACTIVATION_GAP = 1e-4
OPENAI_MEAN = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(3, 1, 1)
OPENAI_STD = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _seeded(arch: str, seed: int = SEED) -> CLIP:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.create_model(arch, pretrained=None).eval()


@torch.no_grad()
def _reference(model: CLIP, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = open_clip.SimpleTokenizer(context_length=model.context_length)(TEXTS)
    return F.normalize(model.encode_image(images), dim=-1), F.normalize(model.encode_text(tokens), dim=-1)


def _from_token_embeddings(backbone) -> torch.Tensor:
    """TEXTS through the text tower from their token embeddings (the prompt-learning path)."""
    tokens = backbone.tokenize(TEXTS)
    with torch.no_grad():
        return backbone.forward_text_embeddings(backbone.token_embeddings(tokens), tokens).cpu()


def _embed(backbone, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return backbone.encode_images(images), backbone.encode_texts(TEXTS)


def _assert_same(got, expected, atol: float = ATOL) -> None:
    torch.testing.assert_close(got[0], expected[0], atol=atol, rtol=0)
    torch.testing.assert_close(got[1], expected[1], atol=atol, rtol=0)


def _link(src: Path, dst: Path) -> None:
    """Hard-link a 600 MB weights file (a copy where the filesystem has no hard links)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _load(path, **kwargs):
    return load_model(str(path), device="cpu", **kwargs)


def _activations(model: torch.nn.Module) -> set[type]:
    """Types of the MLP activations of every residual block (both towers)."""
    acts = [type(block.mlp.gelu) for block in model.modules() if hasattr(getattr(block, "mlp", None), "gelu")]
    assert len(acts) == 24, "expected 12 + 12 residual blocks"
    return set(acts)


def _round_to_fp16(model: torch.nn.Module) -> None:
    """Make every weight exactly representable in fp16, as in OpenAI's released (fp16) checkpoints."""
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.half().float())


def _small_clip(quick_gelu: bool) -> CLIP:
    """A 1+1-layer CLIP with 64-wide heads, so OpenAI-layout inference (width // 64 heads) rebuilds it exactly."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = CLIP(embed_dim=64, quick_gelu=quick_gelu,
                     vision_cfg={"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "head_width": 64},
                     text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1})
    return model.eval()


def _small_images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(SEED))


def _trace(model: CLIP, image_size: int) -> torch.jit.ScriptModule:
    return torch.jit.trace_module(model, {
        "encode_image": (torch.ones(1, 3, image_size, image_size),),
        "encode_text": (torch.zeros(1, model.context_length, dtype=torch.long),),
    }, check_trace=False)  # only the archive's state_dict() matters to the loader


def _trace_openai_style(model: CLIP, path: Path) -> None:
    """Save a TorchScript archive whose ``state_dict()`` has exactly OpenAI's key layout.

    open_clip keeps the causal text mask as a (non-persistent) buffer, which TorchScript would
    store in the archive's state dict; OpenAI's CLIP held it as a plain attribute, a constant of
    the traced graph. Mimic that while tracing, then put the buffer back.
    """
    mask = model._buffers.pop("attn_mask")
    model._non_persistent_buffers_set.discard("attn_mask")
    model.attn_mask = mask
    try:
        traced = _trace(model, model.visual.image_size[0])
    finally:
        del model.attn_mask
        model.register_buffer("attn_mask", mask, persistent=False)
    assert "attn_mask" not in traced.state_dict()
    torch.jit.save(traced, str(path))


class _Payload:
    """Unpickling this calls ``_mark_unpickled(path)``: evidence that a loader executed a pickle."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return _mark_unpickled, (self.path,)


def _mark_unpickled(path: str) -> None:
    Path(path).write_text("executed")


class _EvilStateDict(collections.OrderedDict):
    """A state dict whose class is not one ``weights_only`` may construct."""


# --------------------------------------------------------------------------------------------
# module-scoped fixtures: build and save each format once
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("model-formats")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(SEED)
    return torch.randn(2, 3, 224, 224, generator=generator)


@pytest.fixture(scope="module")
def pil_image() -> Image.Image:
    rng = np.random.default_rng(SEED)
    return Image.fromarray(rng.integers(0, 256, size=(180, 300, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def ref_model() -> CLIP:
    return _seeded(ARCH)


@pytest.fixture(scope="module")
def ref_out(ref_model, images):
    return _reference(ref_model, images)


@pytest.fixture(scope="module")
def ref_state(ref_model) -> dict[str, torch.Tensor]:
    return {key: value.detach() for key, value in ref_model.state_dict().items()}


@pytest.fixture(scope="module")
def files(workdir, ref_state) -> dict[str, Path]:
    """The reference weights saved once in each open_clip checkpoint format."""
    paths = {
        "pt": workdir / "vitb32.pt",
        "bin": workdir / "vitb32.bin",
        "safetensors": workdir / "vitb32.safetensors",
        "ddp": workdir / "vitb32-epoch3.pt",
    }
    torch.save(ref_state, paths["pt"])
    # a .bin is the same torch.save zip under another name (linked: same bytes, no second write)
    _link(paths["pt"], paths["bin"])
    # safetensors refuses non-contiguous tensors and tensors sharing storage (ViT-B-32 has neither;
    # a model with tied weights would need {key: value.contiguous().clone()})
    save_file({key: value.contiguous() for key, value in ref_state.items()}, str(paths["safetensors"]))
    ddp = {"module." + key: value for key, value in ref_state.items()}
    torch.save({"state_dict": ddp, "epoch": 3}, paths["ddp"])
    return paths


@pytest.fixture(scope="module")
def loaded(files, images):
    """Each open_clip checkpoint loaded with ``arch``: (embeddings, model_id, info, dense features)."""
    out = {}
    for fmt, path in files.items():
        backbone = _load(path, arch=ARCH)
        out[fmt] = {
            "emb": _embed(backbone, images),
            "model_id": backbone.model_id,
            "info": backbone.info,
            "embed_dim": backbone.embed_dim,
            "benchmark": backbone.benchmark_names(),
        }
        if fmt == "safetensors":
            out[fmt]["dense"] = backbone.dense_features(images)
            out[fmt]["preprocess"] = backbone.preprocess
            out[fmt]["from_token_embeddings"] = _from_token_embeddings(backbone)
        del backbone
    return out


@pytest.fixture(scope="module")
def qgelu_model() -> CLIP:
    """Stands in for an OpenAI release: QuickGELU, weights exactly representable in fp16 like OpenAI's.

    (fp16-exact weights also keep these comparisons free of the fp16-cast bug that
    test_fp32_openai_layout_state_dict_keeps_full_precision documents.)
    """
    model = _seeded(f"{ARCH}-quickgelu", seed=SEED + 1)
    _round_to_fp16(model)
    return model


@pytest.fixture(scope="module")
def qgelu_out(qgelu_model, images):
    return _reference(qgelu_model, images)


@pytest.fixture(scope="module")
def openai_files(workdir, qgelu_model) -> dict[str, Path]:
    paths = {"jit": workdir / "ViT-B-32-openai-jit.pt", "plain": workdir / "ViT-B-32-openai-sd.pt"}
    _trace_openai_style(qgelu_model, paths["jit"])
    torch.save(qgelu_model.state_dict(), paths["plain"])
    return paths


@pytest.fixture(scope="module")
def openai_plain_loads(openai_files, images):
    """The plain OpenAI-layout state dict loaded without arch, with default and with forced QuickGELU."""
    out = {}
    for label, kwargs in (("default", {}), ("quick", {"quick_gelu": True})):
        backbone = _load(openai_files["plain"], **kwargs)
        out[label] = {"model_id": backbone.model_id, "info": backbone.info, "acts": _activations(backbone.model),
                      # the activation-mismatch check needs only one tower
                      "emb": _embed(backbone, images) if label == "quick" else (backbone.encode_images(images),)}
        del backbone
    return out


@pytest.fixture(scope="module")
def hf_dirs(workdir, ref_state) -> dict[str, Path]:
    """The reference weights as transformers CLIPModel folders: safetensors and pytorch_model.bin."""
    hf_model = to_hf_clip(ref_state, hidden_act="gelu")
    paths = {"safetensors": workdir / "hf-safetensors", "bin": workdir / "hf-bin"}
    hf_model.save_pretrained(str(paths["safetensors"]))
    paths["bin"].mkdir()
    hf_model.config.save_pretrained(str(paths["bin"]))
    torch.save(hf_model.state_dict(), paths["bin"] / "pytorch_model.bin")
    assert sorted(os.listdir(paths["safetensors"])) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(paths["bin"])) == ["config.json", "pytorch_model.bin"]
    return paths


@pytest.fixture(scope="module")
def open_clip_dir(workdir, files) -> Path:
    """An open_clip model folder (as open_clip's push_to_hf_hub writes it), weights hard-linked."""
    path = workdir / "open-clip-folder"
    path.mkdir()
    _link(files["safetensors"], path / "open_clip_model.safetensors")
    config = {"model_cfg": open_clip.get_model_config(ARCH), "preprocess_cfg": {
        "mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}}
    (path / "open_clip_config.json").write_text(json.dumps(config))
    return path


# --------------------------------------------------------------------------------------------
# 1. open_clip checkpoints with arch
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["pt", "bin", "safetensors", "ddp"])
def test_open_clip_checkpoint_with_arch_matches_reference(fmt, loaded, ref_out, files):
    got = loaded[fmt]
    assert got["emb"][0].shape == (2, 512) and got["emb"][1].shape == (3, 512)
    _assert_same(got["emb"], ref_out)
    assert got["info"].quick_gelu is False
    assert got["info"].extra["arch"] == ARCH
    assert got["embed_dim"] == 512
    assert got["model_id"].startswith(f"file:{ARCH}:") and got["model_id"].endswith(":qgelu0")
    assert got["benchmark"] == (ARCH, str(files[fmt]))


def test_text_tower_from_token_embeddings_matches_encode_texts(loaded):
    torch.testing.assert_close(loaded["safetensors"]["from_token_embeddings"], loaded["safetensors"]["emb"][1],
                               atol=ATOL, rtol=0)


def test_all_checkpoint_formats_give_identical_embeddings(loaded):
    first = loaded["pt"]["emb"]
    for fmt in ("bin", "safetensors", "ddp"):
        assert torch.equal(loaded[fmt]["emb"][0], first[0]), fmt
        assert torch.equal(loaded[fmt]["emb"][1], first[1]), fmt


def test_open_clip_dense_features_come_from_the_reference_weights(loaded, ref_model, images):
    dense = loaded["safetensors"]["dense"]
    assert dense.shape == (2, 49, 512)
    visual = ref_model.visual
    with torch.no_grad():
        tokens = visual.transformer(visual._embeds(images))
        expected = F.normalize(visual.ln_post(tokens[:, 1:]) @ visual.proj, dim=-1)
    torch.testing.assert_close(dense, expected, atol=ATOL, rtol=0)


# --------------------------------------------------------------------------------------------
# 2. open_clip checkpoints with config=
# --------------------------------------------------------------------------------------------
def test_model_config_json(workdir, files, images, ref_out, loaded, pil_image):
    config = workdir / "vit-b-32-config.json"
    config.write_text(json.dumps(open_clip.get_model_config(ARCH)))
    backbone = _load(files["safetensors"], config=config)
    _assert_same(_embed(backbone, images), ref_out)
    assert backbone.info.quick_gelu is False
    assert backbone.model_id.endswith(":qgelu0")
    # no preprocess_cfg given: same image transform as the built-in architecture
    expected = loaded["safetensors"]["preprocess"](pil_image)
    assert backbone.preprocess(pil_image).shape == (3, 224, 224)
    torch.testing.assert_close(backbone.preprocess(pil_image), expected, atol=1e-6, rtol=0)


def test_open_clip_config_json_with_model_cfg_and_preprocess_cfg(workdir, files, images, ref_out, loaded,
                                                                  pil_image):
    config = workdir / "open_clip_config.json"
    half = [0.5, 0.5, 0.5]
    config.write_text(json.dumps({"model_cfg": open_clip.get_model_config(ARCH),
                                  "preprocess_cfg": {"mean": half, "std": half}}))
    backbone = _load(files["pt"], config=config)
    _assert_same(_embed(backbone, images), ref_out)
    # preprocess_cfg is applied: same resize/crop as the built-in transform, mean/std 0.5 instead
    openai = loaded["safetensors"]["preprocess"](pil_image)
    pixels = openai * OPENAI_STD + OPENAI_MEAN
    torch.testing.assert_close(backbone.preprocess(pil_image), (pixels - 0.5) / 0.5, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------
# 3. OpenAI formats (TorchScript archive, plain state dict) without arch
# --------------------------------------------------------------------------------------------
def test_openai_torchscript_archive_uses_quickgelu(openai_files, images, qgelu_out):
    backbone = _load(openai_files["jit"])
    assert backbone.info.source == "openai-jit"
    assert backbone.info.quick_gelu is True
    assert backbone.benchmark_names() == (backbone.info.extra["arch"], str(openai_files["jit"]))
    assert backbone.model_id.endswith(":qgelu1")
    assert _activations(backbone.model) == {open_clip.transformer.QuickGELU}
    got = _embed(backbone, images)
    _assert_same(got, qgelu_out)


def test_openai_plain_state_dict_quickgelu_is_applied(openai_plain_loads, qgelu_out):
    quick, default = openai_plain_loads["quick"], openai_plain_loads["default"]
    assert quick["info"].quick_gelu is True and quick["acts"] == {open_clip.transformer.QuickGELU}
    _assert_same(quick["emb"], qgelu_out)
    # default: plain GELU, which gives measurably different embeddings from the same weights
    assert default["info"].quick_gelu is False and default["acts"] == {torch.nn.GELU}
    assert float((default["emb"][0] - qgelu_out[0]).abs().max()) > ACTIVATION_GAP


def test_fp32_openai_layout_state_dict_keeps_full_precision(tmp_path):
    """open_clip's own CLIP state dicts have OpenAI's key layout: without arch they must load losslessly.

    (A small model keeps this fast; the ViT-B-32 checkpoint of this module is off by ~5e-5 the same way.)
    """
    model = _small_clip(quick_gelu=False)
    path = tmp_path / "fp32-openai-layout.pt"
    torch.save(model.state_dict(), path)
    backbone = _load(path)
    assert backbone.info.extra["arch"] == "openai-layout"
    x = _small_images()
    _assert_same(_embed(backbone, x), _reference(model, x))


def test_torchscript_archive_traced_from_open_clip(tmp_path):
    model = _small_clip(quick_gelu=True)
    _round_to_fp16(model)
    path = tmp_path / "open-clip-traced.pt"
    traced = _trace(model, 32)
    assert "attn_mask" in traced.state_dict()
    torch.jit.save(traced, str(path))
    backbone = _load(path)
    assert backbone.info.quick_gelu is True
    x = _small_images()
    _assert_same(_embed(backbone, x), _reference(model, x))


# --------------------------------------------------------------------------------------------
# 4. Hugging Face CLIPModel folders
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_loaded(hf_dirs, images, workdir):
    """Each HF folder loaded once, plus a copy whose config.json says quick_gelu (same weights file)."""
    quick = workdir / "hf-quickgelu"
    quick.mkdir()
    _link(hf_dirs["safetensors"] / "model.safetensors", quick / "model.safetensors")
    config = json.loads((hf_dirs["safetensors"] / "config.json").read_text())
    config["text_config"]["hidden_act"] = config["vision_config"]["hidden_act"] = "quick_gelu"
    (quick / "config.json").write_text(json.dumps(config))
    out = {}
    for kind, path in (*hf_dirs.items(), ("quick", quick)):
        backbone = _load(path)
        out[kind] = {"model_id": backbone.model_id, "info": backbone.info, "embed_dim": backbone.embed_dim,
                     "logit_scale": backbone.logit_scale, "images": backbone.encode_images(images)}
        if kind != "quick":
            out[kind]["texts"] = backbone.encode_texts(TEXTS)
            out[kind]["dense"] = backbone.dense_features(images)
            out[kind]["from_token_embeddings"] = _from_token_embeddings(backbone)
            out[kind]["benchmark"] = backbone.benchmark_names()
        del backbone
    return out


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_hugging_face_folder_matches_open_clip_reference(kind, hf_loaded, ref_out, ref_model, loaded, hf_dirs):
    got = hf_loaded[kind]
    assert got["info"].source == "hf" and got["info"].quick_gelu is False
    assert got["embed_dim"] == 512
    assert got["model_id"].startswith("hf:")
    _assert_same((got["images"], got["texts"]), ref_out, atol=HF_ATOL)
    assert got["logit_scale"] == pytest.approx(float(ref_model.logit_scale.detach().exp()), rel=1e-6)
    assert got["dense"].shape == (2, 49, 512)
    torch.testing.assert_close(got["dense"], loaded["safetensors"]["dense"], atol=HF_ATOL, rtol=0)
    torch.testing.assert_close(got["from_token_embeddings"], got["texts"], atol=ATOL, rtol=0)
    assert got["benchmark"] == (str(hf_dirs[kind]), str(hf_dirs[kind]))


def test_hugging_face_hidden_act_from_config_is_applied(hf_loaded, ref_out):
    """Same weights, config.json saying quick_gelu: the activation must change the outputs."""
    assert hf_loaded["quick"]["info"].quick_gelu is True
    assert float((hf_loaded["quick"]["images"] - ref_out[0]).abs().max()) > ACTIVATION_GAP


def test_hugging_face_model_id_depends_on_config(hf_loaded):
    assert hf_loaded["quick"]["model_id"] != hf_loaded["safetensors"]["model_id"]


# --------------------------------------------------------------------------------------------
# open_clip model folders (open_clip_config.json + weights)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def open_clip_dir_loaded(open_clip_dir, images):
    out = {}
    for label, kwargs in (("default", {}), ("quick", {"quick_gelu": True})):
        backbone = _load(open_clip_dir, **kwargs)
        out[label] = {"model_id": backbone.model_id, "acts": _activations(backbone.model),
                      "benchmark": backbone.benchmark_names()}
        if label == "default":
            out[label]["emb"] = _embed(backbone, images)
        del backbone
    return out


def test_open_clip_folder_matches_reference(open_clip_dir_loaded, ref_out, open_clip_dir):
    got = open_clip_dir_loaded["default"]
    _assert_same(got["emb"], ref_out)
    assert got["acts"] == {torch.nn.GELU}
    assert got["model_id"].startswith("dir:")
    assert got["benchmark"] == (open_clip_dir.name, str(open_clip_dir))


def test_open_clip_folder_quick_gelu_is_applied(open_clip_dir_loaded):
    assert open_clip_dir_loaded["quick"]["acts"] == {open_clip.transformer.QuickGELU}


def test_open_clip_folder_model_id_depends_on_quick_gelu(open_clip_dir_loaded):
    assert open_clip_dir_loaded["default"]["model_id"] != open_clip_dir_loaded["quick"]["model_id"]


def test_open_clip_folder_without_weights_is_refused(tmp_path):
    from cliplab.models.tiny import TINY_CONFIG

    path = tmp_path / "open-clip-no-weights"
    path.mkdir()
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CONFIG}))
    with pytest.raises(ModelLoadError):
        _load(path)


def test_open_clip_folder_with_wrong_weights_raises_model_load_error(tmp_path):
    from cliplab.models.tiny import TINY_CONFIG  # 2+2 layers; the small CLIP below has 1+1

    path = tmp_path / "open-clip-wrong-weights"
    path.mkdir()
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CONFIG}))
    save_file(_small_clip(quick_gelu=False).state_dict(), str(path / "open_clip_model.safetensors"))
    with pytest.raises(ModelLoadError, match="do not fit"):
        _load(path)


# --------------------------------------------------------------------------------------------
# 5. model_id
# --------------------------------------------------------------------------------------------
def test_model_id_is_stable_and_tracks_weights(workdir, files, ref_state, images, ref_out, loaded):
    again = _load(files["safetensors"], arch=ARCH)
    assert again.model_id == loaded["safetensors"]["model_id"]
    del again
    perturbed = {key: value.contiguous() for key, value in ref_state.items()}
    perturbed["visual.proj"] = ref_state["visual.proj"].clone()
    perturbed["visual.proj"][0, 0] += 1.0
    path = workdir / "vitb32-perturbed.safetensors"
    save_file(perturbed, str(path))
    other = _load(path, arch=ARCH)
    assert other.model_id != loaded["safetensors"]["model_id"]
    assert other.model_id.startswith(f"file:{ARCH}:")
    assert not torch.allclose(other.encode_images(images), ref_out[0], atol=ATOL)  # the weights did change


def test_model_id_differs_between_quick_gelu_loads(openai_plain_loads):
    assert openai_plain_loads["default"]["model_id"] != openai_plain_loads["quick"]["model_id"]


def test_model_id_fingerprints_content_not_path(loaded, files):
    """.pt and .bin are the same bytes under two names: one model_id (the file's sha256, not its path)."""
    assert files["pt"] != files["bin"] and files["pt"].stat().st_size == files["bin"].stat().st_size
    assert loaded["pt"]["model_id"] == loaded["bin"]["model_id"]


# --------------------------------------------------------------------------------------------
# 6. unsafe or corrupt files
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".pt", ".bin", ".safetensors"])
def test_corrupt_file_raises_model_load_error(tmp_path, suffix):
    path = tmp_path / f"corrupt{suffix}"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ModelLoadError, match="not a readable weights file"):
        _load(path, arch=ARCH)


def test_pickle_with_code_is_never_executed(tmp_path):
    sentinel = tmp_path / "sentinel.txt"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"visual.proj": torch.zeros(2)}, "x": _Payload(str(sentinel))}, path)
    with pytest.raises(ModelLoadError, match="not a readable weights file"):
        _load(path)
    with pytest.raises(ModelLoadError):
        _load(path, arch=ARCH)
    assert not sentinel.exists()
    # the payload is live: an unrestricted unpickle would have run it
    torch.load(path, weights_only=False)
    assert sentinel.read_text() == "executed"


def test_state_dict_of_unknown_class_is_refused(tmp_path, ref_state):
    path = tmp_path / "subclassed.pt"
    torch.save(_EvilStateDict((key, ref_state[key]) for key in ("logit_scale", "text_projection")), path)
    with pytest.raises(ModelLoadError, match="not a readable weights file"):
        _load(path)


# --------------------------------------------------------------------------------------------
# 7. errors
# --------------------------------------------------------------------------------------------
def test_unknown_name_raises():
    with pytest.raises(ModelLoadError, match="unknown model"):
        load_model("no-such-model-anywhere", device="cpu")


def test_folder_that_is_no_model_raises_with_path(tmp_path):
    folder = tmp_path / "just-a-folder"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError) as err:
        _load(folder)
    assert str(folder) in str(err.value)


def test_hugging_face_folder_without_weights_raises_model_load_error(tmp_path):
    from transformers import CLIPConfig

    folder = tmp_path / "hf-no-weights"
    CLIPConfig().save_pretrained(str(folder))
    assert os.listdir(folder) == ["config.json"]
    with pytest.raises(ModelLoadError, match="no model.safetensors or pytorch_model.bin"):
        _load(folder)


def test_weights_that_do_not_fit_arch_raise(tmp_path):
    from cliplab.models.tiny import build_tiny_model

    path = tmp_path / "tiny.pt"
    torch.save(build_tiny_model(0).state_dict(), path)
    with pytest.raises(ModelLoadError, match="do not fit the architecture"):
        _load(path, arch=ARCH)


def test_unknown_arch_and_unrecognised_layout_raise(tmp_path, files):
    with pytest.raises(ModelLoadError, match="not an open_clip architecture"):
        _load(files["safetensors"], arch="ViT-Nope-99")
    path = tmp_path / "other-layout.pt"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(ModelLoadError, match="cannot tell the architecture"):
        _load(path)
    bad_config = tmp_path / "bad-config.json"
    bad_config.write_text(json.dumps({"embed_dim": 512}))
    with pytest.raises(ModelLoadError, match="needs embed_dim, vision_cfg and text_cfg"):
        _load(files["safetensors"], config=bad_config)
