"""Inference precision and runtime (models/runtime.py): ONNX equals torch, bf16 keeps the direction of the
embeddings, int8 agrees, caches never mix precisions or runtimes, bad options and failed exports are clear."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cliplab.errors import DeviceError, UnsupportedOperationError
from cliplab.features import embed_images, embed_texts, image_cache, text_cache
from cliplab.fileio import digest
from cliplab.models import load_model, runtime
from cliplab.models.runtime import BASELINE, DEFAULT_PRECISION, DEFAULT_RUNTIME, Engine

HAS_ONNX = runtime.onnx_missing() is None
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason=f"onnx runtime: {runtime.onnx_missing()}")
TEXTS = ["a photo of a cat.", "a blurry photo of a dog.", "an airplane", "x"]


def _variant(backbone, precision=None, runtime_=None, onnx_dir=None):
    """The same weights with another engine (a shallow copy: the model is shared)."""
    return copy.copy(backbone).set_inference(precision, runtime_, onnx_dir=onnx_dir)


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1)  # both L2-normalised


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn((n, 3, size, size), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def vit_b32():
    """A real architecture with random weights (open_clip ViT-B-32, seed 0)."""
    return load_model("ViT-B-32", "random", device="cpu")


@pytest.fixture(scope="module")
def b32_images():
    return _images(2, 224)


@pytest.fixture(scope="module")
def b32_reference(vit_b32, b32_images):
    return vit_b32.encode_images(b32_images), vit_b32.encode_texts(TEXTS)


# -- defaults and keys ----------------------------------------------------------------------
def test_defaults_are_fp32_torch_and_keep_the_cache_keys_caches_had(tiny, tmp_path):
    assert (DEFAULT_PRECISION, DEFAULT_RUNTIME) == ("fp32", "torch")
    assert tiny.encoding_id == tiny.text_encoding_id == BASELINE == "fp32-torch"
    assert image_cache(tiny, tmp_path).space == "img-" + digest(tiny.model_id, tiny.preprocess_id)
    assert text_cache(tiny, tmp_path).space == "txt-" + digest(tiny.model_id, tiny.tokenizer_id)


def test_the_cli_default_is_the_one_in_models_runtime():
    from cliplab.cli.common import RUN_OPTIONS, RunOptions

    assert RunOptions().precision is None and RunOptions().runtime is None  # None: load_model's default
    assert f"({DEFAULT_PRECISION} now)" in RUN_OPTIONS["precision"].help
    assert f"({DEFAULT_RUNTIME} now)" in RUN_OPTIONS["runtime"].help


def test_onnx_exports_live_under_the_cache_root(monkeypatch, tmp_path):
    from cliplab.features import cache_root

    expected = {"CLIPLAB_CACHE": tmp_path / "c", "XDG_CACHE_HOME": tmp_path / "x" / "cliplab"}
    for key, root in expected.items():
        monkeypatch.delenv("CLIPLAB_CACHE", raising=False)
        monkeypatch.setenv(key, str(tmp_path / ("c" if key == "CLIPLAB_CACHE" else "x")))
        assert runtime.default_onnx_dir() == root / "onnx"
        assert cache_root() == root / "features"


# -- bad options --------------------------------------------------------------------------
def test_fp16_on_the_cpu_is_a_clear_error(tiny):
    with pytest.raises(DeviceError, match="--precision fp16 runs on CUDA only.*cpu"):
        load_model("tiny", precision="fp16")
    with pytest.raises(DeviceError, match="fp16"):
        _variant(tiny, "fp16")
    engine = Engine("fp16", "torch")  # a GPU model moved to the CPU afterwards
    with pytest.raises(DeviceError, match="CUDA only"):
        engine.forward(tiny, "image", _images(1, 32))


@pytest.mark.parametrize("precision, runtime_, message", [
    ("fp8", None, "--precision fp8: not one of fp32, bf16, fp16"),
    (None, "tensorrt", "--runtime tensorrt: not one of torch, onnx, int8"),
    ("bf16", "onnx", "--runtime onnx runs in fp32"),
    ("bf16", "int8", "--runtime int8 runs in fp32"),
])
def test_unknown_or_incompatible_options_name_the_option(precision, runtime_, message):
    with pytest.raises(UnsupportedOperationError, match=message):
        load_model("tiny", precision=precision, runtime=runtime_)


def test_onnx_and_int8_refuse_a_gpu_device():
    with pytest.raises(DeviceError, match="--runtime onnx runs on the CPU"):
        runtime.check_options("fp32", "onnx", "cuda")
    with pytest.raises(DeviceError, match="--runtime int8 runs on the CPU"):
        runtime.check_options(None, "int8", "cuda:0")
    assert runtime.check_options(None, None, "cuda") == ("fp32", "torch")
    assert runtime.check_options("fp16", None, "cuda") == ("fp16", "torch")


# -- bf16 ---------------------------------------------------------------------------------
def test_bf16_tiny_keeps_cosine_and_really_runs_in_bf16(tiny):
    images = _images(8, 32)
    fp32, bf16 = tiny.encode_images(images), _variant(tiny, "bf16").encode_images(images)
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape
    assert _cosines(fp32, bf16).min() >= 0.999
    assert (fp32 - bf16).abs().max() > 1e-5  # autocast did change the arithmetic
    texts = _variant(tiny, "bf16").encode_texts(TEXTS)
    assert _cosines(tiny.encode_texts(TEXTS), texts).min() >= 0.999
    np.testing.assert_allclose(texts.norm(dim=-1), 1.0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.integration
def test_bf16_vit_b32_keeps_cosine(vit_b32, b32_images, b32_reference):
    """One image and one text: bf16 autocast is emulated (slow) on CPUs without AVX512-BF16 or AMX."""
    bf16 = _variant(vit_b32, "bf16")
    assert bf16.encoding_id == "bf16-torch"
    images, texts = bf16.encode_images(b32_images[:1]), bf16.encode_texts(TEXTS[:1])
    assert _cosines(b32_reference[0][:1], images).min() >= 0.999
    assert _cosines(b32_reference[1][:1], texts).min() >= 0.999
    assert (b32_reference[0][:1] - images).abs().max() > 1e-5


def test_training_methods_stay_fp32(tiny):
    images = _images(2, 32)
    bf16 = _variant(tiny, "bf16")
    torch.testing.assert_close(bf16.forward_images(images), tiny.forward_images(images), rtol=0, atol=0)
    assert bf16.forward_images(images).dtype == torch.float32


# -- int8 ---------------------------------------------------------------------------------
def test_int8_quantises_a_copy_and_agrees(vit_b32, b32_images, b32_reference, record_property):
    int8 = _variant(vit_b32, None, "int8")
    assert int8.encoding_id == int8.text_encoding_id == "fp32-int8"
    images, texts = int8.encode_images(b32_images), int8.encode_texts(TEXTS)
    image_cos, text_cos = _cosines(b32_reference[0], images).min().item(), _cosines(b32_reference[1], texts).min()
    record_property("int8_min_cosine_image", image_cos)
    record_property("int8_min_cosine_text", text_cos.item())
    print(f"int8 vs fp32 on ViT-B-32 (random weights): min cosine image {image_cos:.5f}, text {text_cos:.5f}")
    assert image_cos >= 0.99 and text_cos >= 0.99, (image_cos, text_cos)
    assert (b32_reference[0] - images).abs().max() > 1e-4  # quantised arithmetic, not the fp32 model
    shadow = int8.engine._quantized[1]
    quantized = [m for m in shadow.model.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert len(quantized) >= 48  # 12 image + 12 text blocks, two MLP layers each
    assert not any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in vit_b32.model.modules())


def test_int8_runs_a_modified_resnet_whose_attention_pool_stays_float(tmp_path):
    """ModifiedResNet's attention pool reads its projections as tensors: they must not be quantised."""
    from open_clip.model import CLIP

    from cliplab.models.runtime import _quantizable_linears

    model = CLIP(embed_dim=32, vision_cfg={"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
                 text_cfg={"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1})
    names = _quantizable_linears(model)
    assert not any(name.startswith("visual.attnpool.") for name in names)
    assert "transformer.resblocks.0.mlp.c_fc" in names and "transformer.resblocks.0.attn.out_proj" not in names
    torch.save(model.state_dict(), tmp_path / "rn.pt")
    config = tmp_path / "rn.json"
    config.write_text(json.dumps({"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
                                  "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                                               "layers": 1}}))
    fp32 = load_model(str(tmp_path / "rn.pt"), config=config)
    int8 = load_model(str(tmp_path / "rn.pt"), config=config, runtime="int8")
    images = _images(4, 32)
    assert int8.encoding_id == "fp32-int8"
    assert _cosines(fp32.encode_images(images), int8.encode_images(images)).min() > 0.99


def test_int8_follows_changed_weights(tiny):
    images = _images(4, 32)
    child = tiny.derive("ft", trainable=False).set_inference(None, "int8")
    before = child.encode_images(images)
    with torch.no_grad():
        child.model.visual.proj.mul_(-1.0)  # an in-place update: the quantised copy must be rebuilt
    after = child.encode_images(images)
    torch.testing.assert_close(after, -before, atol=1e-6, rtol=0)
    assert tiny.derive("x").engine is not tiny.engine


# -- onnx ---------------------------------------------------------------------------------
@needs_onnx
def test_onnx_tiny_equals_torch_and_is_exported_once(tiny, tmp_path, monkeypatch, capsys):
    onnx = _variant(tiny, None, "onnx", tmp_path / "onnx")
    assert onnx.encoding_id == onnx.text_encoding_id == "fp32-onnx"
    for n in (1, 5):  # the exported batch size is dynamic
        images = _images(n, 32, seed=n)
        torch.testing.assert_close(onnx.encode_images(images), tiny.encode_images(images), atol=1e-4, rtol=0)
    torch.testing.assert_close(onnx.encode_texts(TEXTS), tiny.encode_texts(TEXTS), atol=1e-4, rtol=0)
    folders = sorted(p.name for p in (tmp_path / "onnx").iterdir())
    assert [name.split("-")[0] for name in folders] == ["image", "text"]  # no temporary folder left behind
    assert all((tmp_path / "onnx" / name / "model.onnx").is_file() for name in folders)
    assert "warning" not in capsys.readouterr().err
    int8 = _variant(tiny, None, "int8")  # onnx features have a cache space of their own
    assert image_cache(onnx, tmp_path).space not in {image_cache(tiny, tmp_path).space,
                                                     image_cache(int8, tmp_path).space}
    assert text_cache(onnx, tmp_path).space != text_cache(tiny, tmp_path).space

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    again = _variant(tiny, None, "onnx", tmp_path / "onnx")
    assert again.encoding_id == "fp32-onnx"
    torch.testing.assert_close(again.encode_images(_images(2, 32)), tiny.encode_images(_images(2, 32)),
                               atol=1e-4, rtol=0)


@needs_onnx
@pytest.mark.slow
@pytest.mark.integration
def test_onnx_vit_b32_image_tower_equals_torch(vit_b32, b32_images, b32_reference, tmp_path):
    onnx = _variant(vit_b32, None, "onnx", tmp_path / "onnx")
    assert onnx.encoding_id == "fp32-onnx"
    torch.testing.assert_close(onnx.encode_images(b32_images), b32_reference[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(onnx.encode_images(b32_images[:1]), b32_reference[0][:1], atol=1e-4, rtol=0)


def test_failed_export_falls_back_to_torch_with_one_warning(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runtime, "onnx_missing", lambda: None)

    def broken(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::frobnicate' is not supported\nmore detail")

    monkeypatch.setattr(torch.onnx, "export", broken)
    onnx = _variant(tiny, None, "onnx", tmp_path / "onnx")
    images = _images(3, 32)
    assert onnx.encoding_id == BASELINE  # the cache key says what really ran
    torch.testing.assert_close(onnx.encode_images(images), tiny.encode_images(images), atol=0, rtol=0)
    onnx.encode_images(images)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: --runtime onnx: cannot run the image tower of tiny (RuntimeError: Exporting the "
                        "operator 'aten::frobnicate' is not supported); using torch fp32 instead"]
    assert image_cache(onnx, tmp_path).space == image_cache(tiny, tmp_path).space
    assert not any((tmp_path / "onnx").iterdir())  # nothing half-written left


def test_missing_onnxruntime_falls_back_naming_the_extra(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runtime, "onnx_missing", lambda: "onnxruntime not installed (pip install 'cliplab[onnx]')")
    onnx = _variant(tiny, None, "onnx", tmp_path / "onnx")
    assert onnx.text_encoding_id == BASELINE
    torch.testing.assert_close(onnx.encode_texts(TEXTS), tiny.encode_texts(TEXTS), atol=0, rtol=0)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "pip install 'cliplab[onnx]'" in err and "text tower" in err


# -- caches -------------------------------------------------------------------------------
@pytest.fixture()
def photos(tmp_path):
    from cliplab.data import image_folder

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        folder = tmp_path / "photos" / cls
        folder.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return image_folder(tmp_path / "photos")


def test_a_cache_never_serves_features_of_another_precision_or_runtime(tiny, photos, tmp_path):
    cache = tmp_path / "cache"
    variants = {"fp32-torch": tiny, "bf16-torch": _variant(tiny, "bf16"), "fp32-int8": _variant(tiny, None, "int8")}
    spaces = {name: image_cache(b, cache).space for name, b in variants.items()}
    assert len(set(spaces.values())) == 3
    first = {}
    for name, backbone in variants.items():  # all into one cache folder, fp32 first
        out = embed_images(backbone, photos, cache, batch_size=8, num_workers=0, progress=False)
        assert out.computed == 6, name  # computed by this variant, never served from another's entries
        batch = torch.stack([backbone.preprocess(photos.load_image(i)) for i in out.indices])
        direct = backbone.encode_images(batch)  # one batch, as embedded (bf16 results depend on batching)
        torch.testing.assert_close(torch.tensor(np.asarray(out.features)), direct, atol=1e-6, rtol=0)
        assert image_cache(backbone, cache).meta["encoding"] == name
        first[name] = np.asarray(out.features).copy()
    assert np.abs(first["fp32-torch"] - first["bf16-torch"]).max() > 1e-5
    assert np.abs(first["fp32-torch"] - first["fp32-int8"]).max() > 1e-5
    for name, backbone in variants.items():  # warm: each gets its own features back
        out = embed_images(backbone, photos, cache, batch_size=8, num_workers=0, progress=False)
        assert out.computed == 0
        np.testing.assert_array_equal(np.asarray(out.features), first[name])


def test_the_text_cache_never_serves_another_precision(tiny, tmp_path):
    cache = tmp_path / "cache"
    fp32 = embed_texts(tiny, TEXTS, cache)
    bf16_backbone = _variant(tiny, "bf16")
    assert text_cache(bf16_backbone, cache).space != text_cache(tiny, cache).space
    bf16 = embed_texts(bf16_backbone, TEXTS, cache)
    np.testing.assert_array_equal(bf16, bf16_backbone.encode_texts(TEXTS).numpy())
    assert np.abs(bf16 - fp32).max() > 1e-5
    np.testing.assert_array_equal(embed_texts(tiny, TEXTS, cache), fp32)


def test_model_id_stays_the_weights_identity(tiny):
    for precision, runtime_ in (("bf16", None), (None, "int8")):
        assert _variant(tiny, precision, runtime_).model_id == tiny.model_id


def test_onnx_extra_declared():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    extra = " ".join(project["optional-dependencies"]["onnx"])
    assert all(name in extra for name in ("onnxruntime", "onnx", "onnxscript"))


# -- command line -------------------------------------------------------------------------
def test_cli_takes_precision_and_runtime(tmp_path):
    from typer.testing import CliRunner

    from cliplab.cli.app import app

    (tmp_path / "photos").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "photos" / "a.png")
    args = ["classify", str(tmp_path / "photos"), "--labels", "cat,dog", "--model", "tiny", "--workers", "0", "-q",
            "--cache-dir", str(tmp_path / "cache")]
    result = CliRunner().invoke(app, [*args, "--precision", "fp16"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert [line for line in result.output.splitlines() if line.startswith("error:")] == [
        "error: --precision fp16 runs on CUDA only (this model is on cpu); use --precision bf16 or fp32"]
    result = CliRunner().invoke(app, [*args, "--precision", "bf16"])
    assert result.exit_code == 0, result.output
    spaces = [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("img-")]
    assert [image_cache(_variant(load_model("tiny"), "bf16"), tmp_path / "cache").space] == [p.name for p in spaces]
