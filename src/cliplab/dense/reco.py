"""ReCo (Shin, Xie and Albanie, NeurIPS 2022, "ReCo: Retrieve and Co-segment for Zero-shot Transfer").

As the authors' ``networks/reco.py`` (NoelShin/reco), training-free ReCo:

1. **Retrieve**: for each class, the ``k`` images of an unlabelled collection whose CLIP image embeddings are
   closest to the class's text embedding (their ``ImageNet1KDataset.set_category``: top-k of ``text @ images``).
   The collection is a folder of images (embedded once through the feature cache) or a built search index
   (``cliplab index build``; its FAISS search). Images go in at the model's input size (resize + centre crop,
   the backbone's own preprocessing, as theirs centre-crop).
2. **Co-segment** (``_cosegment`` / ``_get_reference_image_feature``, ``ref_type="avg"``): dense features of the
   ``k`` images, L2-normalised; for every patch ``p`` and image ``j`` the best weighted cosine to that image's
   patches, ``max_q cos(p, q) * w_q``; its mean over the images is ``p``'s score; each image's seed is its
   best-scoring patch; the reference is the mean of the seeds' (unnormalised) features, L2-normalised
   (:func:`reference_embedding`). The weights ``w`` (1 without the options) multiply in the **text attention**
   ``sigmoid(10 cos(maskclip_token, text))`` and, with **context elimination**, ``1 - sigmoid(cos(feature,
   context_reference))`` for each context category (default theirs: tree, sky, building, road, person), whose
   references are co-segmented first, in order, each using the ones before it (their loop passes the growing
   dict); a class that is itself a context category takes the context reference.
3. **Infer** (``__call__``): ``sigmoid(cos(feature, reference_c))`` per patch and class, times (with
   ``dense_clip_inference``) the text attention ``sigmoid(10 cos(maskclip_token, text_c))``; the pipeline
   averages windows, upsamples and takes the arg-max.

Features (``features``): ``value``, MaskCLIP's value-path tokens of the backbone (what theirs call DenseCLIP
and use for the text attention; also the co-segmentation features here by default); ``final``, the residual
stream's final tokens; ``guidance``, a user-supplied self-supervised encoder (``cliplab segment --guidance``:
theirs co-segment with DeiT-S/16-SIN or DINO), resized bilinearly to CLIP's patch grid at inference.

Departures: (a) their per-image maximum reads ``adj_mat[:, start_col: start_col + end_col]`` with ``end_col`` an
absolute index, so image ``j > 0`` takes the max over images ``j .. 2j+1`` (their slice overruns); here each image's
own patches, as the paper states (with one retrieved image, or for image 0, the two agree; see
``/work/compare/reco``); (b) the text attention is computed on the tower's own grid, not theirs resized from a
separate RN50x16 DenseCLIP; (c) retrieval, text attention and co-segmentation use one backbone (theirs: ViT-L/14@336
to retrieve, RN50x16 for attention); (d) no ReCo+ (the trained DeepLab on pseudo-labels) and no CRF;
(e) context-category text uses the ``imagenet`` templates (theirs: DenseCLIP's 85-template prompt engineering).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CliplabError
from .base import DenseMethod
from .maskclip import value_tokens
from .registry import register_dense

FEATURES = ("value", "final", "guidance")
CONTEXT = "tree,sky,building,road,person"


def reference_embedding(features: torch.Tensor, weights: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """ReCo's co-segmentation of ``features`` (n, d, h, w) with patch ``weights`` (n, h, w) in [0, 1] or None:
    ``(reference (d,) unit vector, seeds (n, 2) row/column of each image's seed)``.

    score(p) = mean over images j of max over j's patches q of cos(p, q) * w_q; seed_i = argmax of the scores of
    image i's patches; reference = normalise(mean_i features[i, :, seed_i])."""
    n, d, h, w = features.shape
    per_patch = features.float().permute(0, 2, 3, 1).reshape(n, h * w, d)
    flat = F.normalize(per_patch.reshape(n * h * w, d), dim=1)
    wflat = None if weights is None else weights.float().reshape(n, h * w)
    best = torch.empty(n * h * w, n)
    for j in range(n):  # one image's columns at a time: (n*h*w, h*w), never the whole adjacency
        sim = flat @ flat[j * h * w:(j + 1) * h * w].T
        if wflat is not None:
            sim = sim * wflat[j][None]
        best[:, j] = sim.max(dim=1).values
    score = best.mean(dim=1).reshape(n, h * w)
    index = score.argmax(dim=1)
    seeds = per_patch[torch.arange(n), index]
    return F.normalize(seeds.mean(dim=0), dim=0), torch.stack([index // w, index % w], dim=1)


def text_attention(tokens: torch.Tensor, text: torch.Tensor, temperature: float = 10.0) -> torch.Tensor:
    """``sigmoid(temperature * cos(token, text))``: (n, d, h, w) x (d,) -> (n, h, w); x (d, C) -> (n, C, h, w)."""
    tokens = F.normalize(tokens.float(), dim=1)
    text = text.to(tokens)
    if text.dim() == 1:
        return torch.sigmoid(temperature * torch.einsum("ndhw,d->nhw", tokens, text))
    return torch.sigmoid(temperature * torch.einsum("ndhw,dc->nchw", tokens, text))


def context_weights(features: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """``prod_k (1 - sigmoid(cos(feature, reference_k)))``: (n, d, h, w) x (K, d) -> (n, h, w)."""
    sims = torch.sigmoid(torch.einsum("ndhw,kd->nkhw", F.normalize(features.float(), dim=1),
                                      F.normalize(references.float(), dim=1)))
    return (1 - sims).prod(dim=1)


@dataclass
class Retrieved:
    """The images retrieved for one text query: PIL images and their names (paths or item ids)."""

    images: list
    names: list[str]


class FolderCollection:
    """A folder of images (any layout ``load_dataset`` reads; labels unused), embedded once through the cache."""

    def __init__(self, path: Path, backbone, cache_dir=None):
        from ..data import load_dataset
        from ..features import embed_images

        self.dataset = load_dataset(path)
        features = embed_images(backbone, self.dataset, cache_dir, progress=False)
        self.vectors = torch.from_numpy(np.array(features.features, dtype=np.float32))  # a writable copy
        self.indices = np.asarray(features.indices)
        if len(self.indices) == 0:
            raise CliplabError(f"{path}: the collection holds no readable image")

    def __len__(self) -> int:
        return len(self.indices)

    def top_k(self, query: torch.Tensor, k: int) -> Retrieved:
        scores = self.vectors @ query.float()
        order = torch.argsort(-scores, stable=True)[:k].tolist()
        positions = [int(self.indices[i]) for i in order]
        return Retrieved([self.dataset.load_image(p) for p in positions],
                         [self.dataset.item_id(p) for p in positions])


class IndexCollection:
    """A search index folder built by ``cliplab index build`` with the same model."""

    def __init__(self, path: Path, backbone):
        from ..search import SearchIndex

        self.index = SearchIndex.open(path)
        self.index.check_model(backbone)
        if len(self.index) == 0:
            raise CliplabError(f"{path}: the search index is empty")

    def __len__(self) -> int:
        return len(self.index)

    def top_k(self, query: torch.Tensor, k: int) -> Retrieved:
        from ..data.images import load_image

        hits = self.index.search_vectors(query.float().numpy()[None], k)[0]
        files = [self.index.image_file(hit.id) for hit in hits]
        return Retrieved([load_image(f) for f in files], [str(f) for f in files])


def open_collection(path, backbone, cache_dir=None):
    """A search index folder (it has an index manifest), else a folder of images or a manifest (``load_dataset``)."""
    from ..search.index import index_manifest

    path = Path(path)
    if not path.exists():
        raise CliplabError(f"reco collection not found: {path}")
    if path.is_dir() and index_manifest(path) is not None:
        return IndexCollection(path, backbone)
    return FolderCollection(path, backbone, cache_dir)


@register_dense("reco", paper="Shin et al. 2022 (ReCo)", needs=("tower", "text_weights", "guidance"))
class ReCo(DenseMethod):
    """ReCo: per-class references co-segmented from top-k images of an unlabelled collection, scored by cosine.

    ``collection``: a folder of images (or a manifest) or a search index folder; ``k`` images per class;
    ``context``: comma-separated context categories removed by context elimination; ``features``: value | final |
    guidance (see the module docstring)."""

    def __init__(self, collection: str = "", k: int = 50, context_elimination: bool = True, context: str = CONTEXT,
                 text_attention: bool = True, dense_clip_inference: bool = True, features: str = "value",
                 temperature: float = 10.0, batch_size: int = 16):
        self.collection = collection
        self.k = k
        self.context_elimination = context_elimination
        self.context = context
        self.text_attention = text_attention
        self.dense_clip_inference = dense_clip_inference
        self.features = features
        self.temperature = temperature
        self.batch_size = batch_size

    def setup(self, context) -> None:
        if self.features not in FEATURES:
            raise CliplabError(f"reco features must be one of {', '.join(FEATURES)}; got {self.features!r}")
        if self.features == "guidance" and context.guidance is None:
            raise CliplabError("reco features=guidance needs a guidance encoder (cliplab segment --guidance WEIGHTS)")
        if not self.collection:
            raise CliplabError("reco needs an unlabelled image collection to retrieve from: --collection DIR (a "
                               "folder of images or a search index folder)")
        if self.k < 1:
            raise CliplabError(f"reco k must be at least 1; got {self.k}")
        super().setup(context)
        self._needs(context.tower, "image tower")
        text = self._needs(context.text_weights, "text weights").float()
        collection = open_collection(self.collection, context.backbone, context.cache_dir)
        self.retrieved_: dict[str, list[str]] = {}
        self.context_references_: dict[str, torch.Tensor] = {}
        if self.context_elimination:
            names = [c.strip() for c in self.context.split(",") if c.strip()]
            if names:
                from ..features.text import class_weights

                vectors = torch.from_numpy(class_weights(context.backbone, names, "imagenet",
                                                         cache_dir=context.cache_dir))
                for i, name in enumerate(names):
                    if name not in self.context_references_:
                        self.context_references_[name] = self._reference(collection, name, vectors[:, i])
        refs = []
        for c, name in enumerate(context.class_names):
            if name in self.context_references_:
                refs.append(self.context_references_[name])
            else:
                refs.append(self._reference(collection, name, text[:, c]))
        self.references_ = torch.stack(refs)  # (C, d') unit rows

    @torch.no_grad()
    def _reference(self, collection, name: str, text: torch.Tensor) -> torch.Tensor:
        found = collection.top_k(text, min(self.k, len(collection)))
        self.retrieved_[name] = found.names
        preprocess = self.context_.backbone.preprocess
        images = torch.stack([preprocess(image.convert("RGB")) for image in found.images])
        feats, tokens = [], []
        for start in range(0, len(images), self.batch_size):
            f, t = self._features(images[start:start + self.batch_size])
            feats.append(f)
            tokens.append(t)
        features = torch.cat(feats)
        weights = torch.ones(features.shape[0], *features.shape[-2:])
        if self.text_attention:
            attention = text_attention(torch.cat(tokens), text, self.temperature)
            if attention.shape[-2:] != features.shape[-2:]:
                attention = F.interpolate(attention[:, None], size=features.shape[-2:], mode="bilinear",
                                          align_corners=False)[:, 0]
            weights = weights * attention
        if self.context_elimination and self.context_references_:
            weights = weights * context_weights(features, torch.stack(list(self.context_references_.values())))
        reference, _ = reference_embedding(features, weights)
        return reference

    def _features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(co-segmentation features (n, d', h', w'), MaskCLIP tokens (n, d, h, w)) of a batch of windows."""
        images = images.to(self.context_.backbone.device, torch.float32)
        tower = self.context_.tower
        tokens = value_tokens(tower, images).float().cpu()
        if self.features == "value":
            return tokens, tokens
        if self.features == "final":
            return tower.tokens(images, "final").permute(0, 3, 1, 2).float().cpu(), tokens
        return self.context_.guidance(images).float().cpu(), tokens

    @torch.no_grad()
    def patch_scores(self, images: torch.Tensor) -> torch.Tensor:
        features, tokens = self._features(images)
        scores = torch.sigmoid(torch.einsum("ndhw,cd->nchw", F.normalize(features, dim=1), self.references_))
        if scores.shape[-2:] != tokens.shape[-2:]:
            scores = F.interpolate(scores, size=tokens.shape[-2:], mode="bilinear", align_corners=False)
        if self.dense_clip_inference:
            scores = scores * text_attention(tokens, self.context_.text_weights.float(), self.temperature)
        return scores
