"""NoLA (paper 2, "CLIP meets DINO for Tuning Zero-Shot Classifier using Unlabeled Image Collections"): a zero-shot
classifier tuned on an unlabelled image collection with a self-supervised vision encoder's help."""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils.validation import check_is_fitted

from ..errors import CliplabError, DatasetError, ModelLoadError, UnsupportedOperationError
from ..models.backbone import Backbone
from ..train.engine import TrainSettings, register_objective, run_training
from ..train.prompts import LazyBatches
from ..train.pseudolabels import select_top_k
from .base import FEWSHOT_SKIPS, ClipHead, ZeroShotLogitsMixin
from .registry import register

SELECTIONS = ("authors", "balanced")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # DINO's input normalisation
ENCODE_BATCH = 128  # images per no-grad pass (DINO features, labelling the pool)
BLUR_SIGMA = (0.1, 2.0)  # their GaussianBlur radius range at 224 px (scaled to the model's input size here)


# ---------------------------------------------------------------------------------------------- selection


def find_k(n_pool: int, n_classes: int, fraction: float = 0.2, minimum: int = 16) -> int:
    """Pseudolabels per class, the authors' ``find_k``: ``floor(n_pool / n_classes * fraction)``, at least
    ``minimum``."""
    return max(int(minimum), math.floor(int(n_pool) / int(n_classes) * float(fraction)))


def authors_top_k(probs, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The authors' ``top_k_indices_per_class2`` restated on probabilities alone: ``(rows, labels)``.

    For each class c in order: the rows whose top-1 class is c, best first by that probability, the first ``k``;
    where none has c as top-1, the rows with c second (by the second probability), else third. Rows already taken
    by an earlier class are dropped (their ``drop_duplicates``, first kept). Ties: lower row first (a stable sort
    where pandas' quicksort is not stable)."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] == 0 or not np.isfinite(probs).all():
        raise CliplabError(f"nola: probabilities must be a finite (rows, classes) array, got shape {probs.shape}")
    if isinstance(k, bool) or int(k) != k or k < 0:
        raise CliplabError(f"nola: k must be an integer >= 0, got {k!r}")
    m, n_classes = probs.shape
    depth = min(3, n_classes)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :depth]  # torch.topk(k=3): top-1, -2, -3 per row
    rows_out, labels_out, taken = [], [], np.zeros(m, dtype=bool)
    for c in range(n_classes):
        chosen = np.zeros(0, dtype=np.int64)
        for rank in range(depth):
            mine = np.flatnonzero(order[:, rank] == c)
            if len(mine):
                chosen = mine[np.argsort(-probs[mine, c], kind="stable")][:int(k)]
                break
        for row in chosen.tolist():
            if not taken[row]:
                taken[row] = True
                rows_out.append(row)
                labels_out.append(c)
    return np.asarray(rows_out, dtype=np.int64), np.asarray(labels_out, dtype=np.int64)


# ---------------------------------------------------------------------------------------------- modules


class AlignmentHead(torch.nn.Module):
    """The authors' ``AdapterMLP`` (their alignment module h): Linear(width, hidden), ReLU, Linear(hidden, C)."""

    def __init__(self, width: int, n_classes: int, hidden: int = 256):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.ReLU(),
                                       torch.nn.Linear(hidden, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


@register_objective("nola-align")
class AlignObjective:
    """Stage 2: cross-entropy of the alignment head on the SSL features of the top-k pseudolabelled rows."""

    def __call__(self, module: AlignmentHead, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        logits = module(batch["features"])
        return F.cross_entropy(logits, batch["labels"]), {}


class NolaModule(torch.nn.Module):
    """Stage 3's student: VPT-shallow tokens ``visual`` (p, width) after the image tower's class token (None: no
    prompts) and the linear head ``weight`` (C, d), initialised to the text classifier; ``norms``, the image tower's
    norm-layer parameters of a derived copy (``train_norms``), train with them. Logits are
    ``logit_scale * normalize(f(x; prompts)) @ weight.T``. The Backbone is a plain attribute."""

    def __init__(self, backbone: Backbone, weight: torch.Tensor, logit_scale: float,
                 visual: torch.Tensor | None = None, norms: Sequence[tuple[str, torch.nn.Parameter]] = ()):
        super().__init__()
        self.backbone = backbone
        self.logit_scale = float(logit_scale)
        self.weight = torch.nn.Parameter(weight.detach().clone().float())
        self.visual = None if visual is None else torch.nn.Parameter(visual.detach().clone().float())
        self.norms = torch.nn.ParameterList([p for _, p in norms])  # the derived copy's own tensors, shared
        self.no_decay = {id(p) for name, p in norms if name.endswith("bias")}  # their no-decay names: biases

    def features(self, images: torch.Tensor) -> torch.Tensor:
        if self.visual is None:
            if len(self.norms):  # trained norm layers: the graph runs through the tower
                return self.backbone.forward_images(images)
            with torch.no_grad():  # a frozen, unprompted tower: no graph through it
                return self.backbone.forward_images(images)
        return self.backbone.forward_images(images, prompts=[self.visual])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * (self.features(images).to(self.weight.dtype) @ self.weight.T)


@register_objective("nola")
class NolaObjective:
    """Stage 3: label-smoothed cross-entropy (the authors' ``LabelSmoothingCrossEntropy``, epsilon 0.1, equal to
    torch's ``label_smoothing``) of the student on the strong view against the alignment head's labels of the weak
    view; weight decay on every trained tensor (their no-decay names match none of them)."""

    def __init__(self, smoothing: float = 0.1):
        self.smoothing = float(smoothing)

    def __call__(self, module: NolaModule, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        logits = module(batch["images"])
        loss = F.cross_entropy(logits, batch["labels"], label_smoothing=self.smoothing)
        return loss, {"agree": float((logits.argmax(dim=1) == batch["labels"]).float().mean())}

    def param_groups(self, module: NolaModule, weight_decay: float) -> list[dict]:
        trained = [p for p in module.parameters() if p.requires_grad]
        return [{"params": [p for p in trained if id(p) not in module.no_decay], "weight_decay": weight_decay},
                {"params": [p for p in trained if id(p) in module.no_decay], "weight_decay": 0.0}]


def norm_parameters(backbone: Backbone) -> list[tuple[str, torch.nn.Parameter]]:
    """The image tower's norm-layer parameters (LayerNorm, BatchNorm, GroupNorm weights and biases), named under
    the model (``visual.ln_pre.weight``); open_clip (``visual``) and Hugging Face (``vision_model``) towers."""
    model = backbone.model
    for attribute in ("visual", "vision_model"):
        tower = getattr(model, attribute, None)
        if isinstance(tower, torch.nn.Module):
            break
    else:
        raise UnsupportedOperationError(f"nola: train_norms needs an open_clip or Hugging Face image tower; "
                                        f"{backbone.info.name} has neither")
    kinds = (torch.nn.LayerNorm, torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm)
    return [(f"{attribute}.{name}.{pname}" if name else f"{attribute}.{pname}", p)
            for name, module in tower.named_modules() if isinstance(module, kinds)
            for pname, p in module.named_parameters(recurse=False)]


# ---------------------------------------------------------------------------------------------- inputs


class _Pool:
    """Images addressed by row over datasets laid end to end (only ``load_image`` is read, never a label)."""

    def __init__(self, parts: list, rows: np.ndarray | None = None):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.rows = np.arange(int(self.starts[-1])) if rows is None else np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, rows: np.ndarray) -> _Pool:
        return _Pool(self.parts, self.rows[np.asarray(rows, dtype=np.int64)])

    def picture(self, i: int):
        row = int(self.rows[i])
        part = int(np.searchsorted(self.starts, row, side="right")) - 1
        dataset, index = self.parts[part], row - int(self.starts[part])
        try:
            return dataset.load_image(index).convert("RGB")
        except Exception as exc:  # noqa: BLE001 - any decoder failure is the item's
            item = dataset.item_id(index) if hasattr(dataset, "item_id") else index
            raise DatasetError(f"nola: image {item} cannot be read: {' '.join(str(exc).split())}") from None


class DinoEncoder:
    """A timm ViT's pooled (class-token) features of CLIP-preprocessed images, renormalised to ImageNet's
    statistics first (DINO's input). Frozen, evaluated without gradients."""

    def __init__(self, model, clip_mean, clip_std):
        self.model = model.eval().requires_grad_(False)
        self.width = int(model.num_features)
        self._clip = torch.tensor(clip_mean).view(1, 3, 1, 1), torch.tensor(clip_std).view(1, 3, 1, 1)
        self._imagenet = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        (cm, cs), (im, istd) = self._clip, self._imagenet
        x = ((images * cs + cm) - im) / istd
        return self.model(x).float()


def load_dino(path: str | Path, arch: str, clip_mean, clip_std) -> DinoEncoder:
    """A :class:`DinoEncoder` of timm architecture ``arch`` with the weights file at ``path`` (safetensors or a
    torch state dict read with ``weights_only=True``: ``dense.guidance.read_state_dict``). One line for a missing
    file, an unreadable one, an unknown architecture or weights that do not fit it."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"nola: DINO checkpoint not found: {path}")
    try:
        import timm
    except ImportError:
        raise ModelLoadError("nola: reading a DINO checkpoint needs timm (pip install timm)") from None
    from ..dense.guidance import read_state_dict

    try:
        model = timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True)
    except Exception as exc:  # noqa: BLE001 - an unknown architecture is one line
        raise ModelLoadError(f"nola: timm cannot build dino_arch {arch!r}: {' '.join(str(exc).split())}") from None
    try:
        state = read_state_dict(path)
    except ModelLoadError as exc:
        raise ModelLoadError(f"nola: DINO checkpoint {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a damaged file is one line
        raise ModelLoadError(f"nola: DINO checkpoint {path} is unreadable ({' '.join(str(exc).split())})") from None
    try:
        missing, _ = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ModelLoadError(f"nola: DINO checkpoint {path} is not a {arch} state dict "
                             f"({str(exc).splitlines()[-1].strip()})") from None
    missing = [k for k in missing if not k.startswith("head")]
    if missing:
        raise ModelLoadError(f"nola: DINO checkpoint {path} is not a {arch} state dict ({len(missing)} weights "
                             f"missing, e.g. {missing[0]})")
    return DinoEncoder(model, clip_mean, clip_std)


# ---------------------------------------------------------------------------------------------- the head


@register("nola", family="encoder", paper=2, needs_backbone=True,
          needs=("descriptions", "llm", "images", "unlabelled"),
          default_templates="dataset", gives=("backbone",), fit_problems=("llm_failures",))
class NoLA(ZeroShotLogitsMixin, ClipHead):
    """NoLA (paper 2): description classifier -> DINO head on its top-k pseudolabels -> VPT prompts + linear head.

    The description-averaged text classifier pseudolabels an unlabelled pool; a self-supervised encoder's head learns
    the top-k per class; VPT-shallow prompts and a linear head learn its labels (weak -> strong views).

    Paper 2 in ../shared/papers.md (Imam et al., "CLIP meets DINO for Tuning Zero-Shot Classifier using Unlabeled
    Image Collections"), read against the authors' code, github.com/fazliimam/NoLA (``trainers/NoLA.py``,
    ``utils/model_utils.py: top_k_indices_per_class2``, ``utils/utils.py: find_k, LabelSmoothingCrossEntropy``,
    ``utils/misc.py`` defaults on Dassl's).

    No label is read: ``fit(X, y, ...)`` takes the pool as ``X`` (+ ``unlabelled``) with its ``images``
    (+ ``unlabelled_images``); ``y`` is only validated (the estimator contract), ``unlabelled`` is reduced to its
    features, the image datasets are only asked for ``load_image`` (a test poisons all of them).

    1. Text classifier (their ``gen_emb``): per class the LLM descriptions (``descriptions``: a CuPL-format file or
       ``{class: [sentences]}``; or ``llm``, a ``cliplab.llm.load_llm`` spec asked in CuPL's style, a failed class
       keeping its templates, listed in ``llm_failures_``) plus the filled ``templates``, each embedding
       normalised, the class mean renormalised: ``text_weights_`` (d, C). Without descriptions it is CLIP's
       template classifier.
    2. Pseudolabels and alignment head: CLIP's softmax ``logit_scale * x . t_c`` over the pool; the top ``k`` per
       class (``k=None``: their ``find_k``, ``max(16, floor(m / C * 0.2))``) by their rule (``selection="authors"``:
       top-1 class first, falling back to the second then third choice for a class nobody predicts, duplicates
       dropped) or ``train.pseudolabels.select_top_k`` (``"balanced"``: short classes filled). A self-supervised
       encoder (``dino_checkpoint``: a timm ViT weights file, ``dino_arch`` its architecture) embeds the pool's
       weak views (the model's preprocessing), and the alignment head h (their ``AdapterMLP``: Linear(D, 256),
       ReLU, Linear(256, C)) learns those pseudolabels: Adam lr 1e-3, 50 epochs, batches of 32, cross-entropy.
    3. Student: VPT-shallow tokens (``n_prompts``, 16, uniform in +-sqrt(6 / (3 p^2 + width)), p the patch size)
       after the class token and a linear head initialised to ``text_weights_`` learn, on every pool image, the
       label ``argmax h(DINO(weak view))`` from the strong view (random resized crop 0.2-1, flip, colour jitter
       0.4/0.4/0.4/0.1 with p 0.8, perspective 0.2 with p 0.5, colour jitter, Gaussian blur): label-smoothed
       (0.1) cross-entropy, AdamW lr 3e-4, weight decay 0.01, constant rate, ``max_epoch`` 10, batches of 32 (the
       last partial batch dropped, Dassl's ``drop_last``). Both trainings run through ``train.engine.run_training``
       (objectives "nola-align", "nola") with checkpoints under ``checkpoint_dir`` (``align/``, ``student/``).

    Prediction: ``logits(X) = logit_scale_ * X @ weights_`` on features of ``backbone_`` (the base model with the
    prompts attached); with ``max_epoch=0`` the head is the text classifier (zero-shot logits).

    Fitted: ``weights_`` (d, C), ``text_weights_`` (d, C), ``vis_ctx_`` (p, width), ``backbone_``,
    ``pseudo_rows_``/``pseudo_labels_`` (the top-k selection, rows of the pool = ``X`` then ``unlabelled``),
    ``norms_``/``norm_names_`` (with ``train_norms``), ``student_labels_`` (the alignment head's label of every pool
    row), ``align_*_`` (its weights), ``k_``,
    ``pool_size_``, ``label_agreement_`` (student labels vs CLIP's argmax), ``ssl_encoder_``, ``llm_failures_``,
    ``final_loss_`` (stage 3's last step), ``logit_scale_``.

    Departures from the authors' code, and why:

    - Logits are ``logit_scale * cos`` (CLIP's scale unless ``logit_scale`` is set); theirs apply the head to
      unnormalised image features (an implicit per-image temperature ||f||). Normalised, the head scores the cached
      features every cliplab pipeline uses and equals the zero-shot classifier at step 0 exactly.
    - Prompts enter before the tower's ``ln_pre`` (cliplab's encoder access), theirs after it: a prompt p here acts
      as their ln_pre(p) (outside comparison: equal to 1e-6).
    - The image tower's norm layers stay frozen by default (``train_norms=False``); theirs train them (LayerNorm,
      or BatchNorm for ResNets, biases without weight decay): ``train_norms=True`` does so on a derived copy and
      keeps them as ``norms_`` (``norm_names_`` in order), which ``rebuild_backbone`` loads back. The default keeps
      the learned state to the prompts and the head and lets a ResNet tower run without gradients through it.
    - Their per-class loop runs over the classes present in the unlabelled set's ground truth
      (``set(df.labels)``); here over every class (no label is read). A class nobody ranks in its top 3 gets no
      pseudolabel (theirs raises). The top-3 needs C >= 3 there; here min(3, C).
    - DINO sees the CLIP-preprocessed image (the model's input size) renormalised to ImageNet's statistics; theirs
      feeds CLIP-normalised 224-px crops to DINO ViT-B/16 from torch.hub (never downloaded here: a local file).
    - Without ``dino_checkpoint`` the alignment head reads CLIP's own image features (one warning; the summary's
      ``ssl_encoder`` says "clip"): NoLA proper needs the DINO file.
    - The blur radius is scaled by input size / 224 (theirs is fixed for 224 px); draws are seeded per
      (``random_state``, epoch, item); no validation-based early stopping (theirs stops on a labelled val split).
    - ``max_unlabelled`` (None: all) draws that many pool rows (seeded) for CPU-sized runs.
    - ResNet image towers take no prompts: ``n_prompts=0`` trains the linear head (and with ``train_norms`` the
      BatchNorm parameters) alone there (else one line).
    """

    _contract_skips = dict(FEWSHOT_SKIPS)

    def __init__(
        self,
        backbone: Backbone,
        class_names: Sequence[str],
        templates="generic",
        descriptions: str | Path | Mapping[str, Sequence[str]] | None = None,
        subset: bool = False,
        llm: str | None = None,
        cache_dir: str | Path | None = None,
        dino_checkpoint: str | None = None,
        dino_arch: str = "vit_base_patch16_224",
        k: int | None = None,
        selection: str = "authors",
        max_unlabelled: int | None = None,
        align_epochs: int = 50,
        align_lr: float = 1e-3,
        align_hidden: int = 256,
        align_batch_size: int = 32,
        n_prompts: int = 16,
        train_norms: bool = False,
        max_epoch: int = 10,
        lr: float = 3e-4,
        weight_decay: float = 0.01,
        label_smoothing: float = 0.1,
        batch_size: int = 32,
        augment: bool = True,
        logit_scale: float | None = None,
        random_state: int = 1,
        checkpoint_dir: str | None = None,
        progress: bool = False,
    ):
        self.backbone = backbone
        self.class_names = class_names
        self.templates = templates
        self.descriptions = descriptions
        self.subset = subset
        self.llm = llm
        self.cache_dir = cache_dir
        self.dino_checkpoint = dino_checkpoint
        self.dino_arch = dino_arch
        self.k = k
        self.selection = selection
        self.max_unlabelled = max_unlabelled
        self.align_epochs = align_epochs
        self.align_lr = align_lr
        self.align_hidden = align_hidden
        self.align_batch_size = align_batch_size
        self.n_prompts = n_prompts
        self.train_norms = train_norms
        self.max_epoch = max_epoch
        self.lr = lr
        self.weight_decay = weight_decay
        self.label_smoothing = label_smoothing
        self.batch_size = batch_size
        self.augment = augment
        self.logit_scale = logit_scale
        self.random_state = random_state
        self.checkpoint_dir = checkpoint_dir
        self.progress = progress

    # ------------------------------------------------------------------ parameters

    def _check_params(self) -> None:
        if self.selection not in SELECTIONS:
            raise CliplabError(f"nola: selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        for key, low in (("k", 1), ("max_unlabelled", 1), ("align_epochs", 0), ("align_hidden", 1),
                         ("align_batch_size", 1), ("n_prompts", 0), ("max_epoch", 0), ("batch_size", 1)):
            value = getattr(self, key)
            if value is None and key in ("k", "max_unlabelled"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise CliplabError(f"nola: {key} must be an integer >= {low}, got {value!r}")
        for key in ("align_lr", "lr"):
            value = float(getattr(self, key))
            if not (np.isfinite(value) and value > 0):
                raise CliplabError(f"nola: {key} must be finite and > 0, got {getattr(self, key)!r}")
        if not (np.isfinite(float(self.weight_decay)) and float(self.weight_decay) >= 0):
            raise CliplabError(f"nola: weight_decay must be finite and >= 0, got {self.weight_decay!r}")
        if not 0 <= float(self.label_smoothing) < 1:
            raise CliplabError(f"nola: label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.dino_checkpoint is not None and not isinstance(self.dino_checkpoint, (str, Path)):
            raise CliplabError(f"nola: dino_checkpoint must be a file path, got {self.dino_checkpoint!r}")

    def _scale(self) -> float:
        return float(self.logit_scale) if self.logit_scale is not None else float(self.backbone.logit_scale)

    def _input_size(self) -> int:
        size = self.backbone.preprocess_config.get("size", 224)
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    # ------------------------------------------------------------------ stage 1

    def text_weights(self) -> tuple[np.ndarray, dict[str, str]]:
        """Stage 1: the (d, C) classifier averaging each class's descriptions and filled templates (CuPL + e), and
        the classes an LLM could not describe (class -> reason)."""
        from ..data.descriptions import load_descriptions
        from ..data.prompts import check_class_names, fill_template, load_templates
        from ..features.text import embed_prompts, ensemble

        names = check_class_names(list(self.class_names), "class names")
        failures: dict[str, str] = {}
        if self.descriptions is not None:
            described = load_descriptions(self.descriptions, names, subset=self.subset)
        elif self.llm is not None:
            from ..data.describe import generate_descriptions

            described, failures = generate_descriptions(self.llm, names, "cupl", progress=bool(self.progress))
        else:
            return self._zeroshot_weights(), failures
        filled = load_templates(self.templates) if self.templates is not None else []
        prompts = [list(described.get(n, [])) + [fill_template(t, n) for t in filled] for n in names]
        empty = [n for n, group in zip(names, prompts) if not group]
        if empty:
            raise CliplabError(f"nola: class {empty[0]!r} has neither descriptions nor templates")
        return ensemble(embed_prompts(self.backbone, prompts, self.cache_dir), True), failures

    # ------------------------------------------------------------------ fitting

    def _pool(self, X, unlabelled, images, unlabelled_images) -> tuple[np.ndarray, _Pool]:
        parts, feats = [], [X]
        if images is None:
            raise CliplabError("nola trains through the image tower and its SSL encoder: fit(X, y, images=...) needs "
                               "the images (a dataset aligned with the rows of X)")
        if len(images) != len(X):
            raise DatasetError(f"nola: {len(images)} images for {len(X)} feature rows")
        parts.append(images)
        if unlabelled is not None:
            extra = np.asarray(getattr(unlabelled, "features", unlabelled))  # an ImageFeatures' labels: never read
            if extra.ndim != 2 or len(extra) == 0:
                raise CliplabError(f"nola: the unlabelled set is empty (shape {extra.shape})")
            extra = self._validate(extra)
            if unlabelled_images is None or len(unlabelled_images) != len(extra):
                raise DatasetError(f"nola: unlabelled_images must be a dataset aligned with the {len(extra)} "
                                   "unlabelled rows")
            feats.append(extra)
            parts.append(unlabelled_images)
        return np.concatenate(feats).astype(np.float32), _Pool(parts)

    def _encode(self, encoder, pool: _Pool) -> np.ndarray:
        """``encoder`` (preprocessed pixels -> features) over the pool's weak views (the model's preprocessing)."""
        preprocess, out = self.backbone.preprocess, []
        for start in range(0, len(pool), ENCODE_BATCH):
            stop = min(len(pool), start + ENCODE_BATCH)
            pixels = torch.stack([preprocess(pool.picture(i)) for i in range(start, stop)])
            out.append(encoder(pixels).float().cpu())
        return torch.cat(out).numpy()

    def fit(self, X, y, unlabelled=None, images=None, unlabelled_images=None):
        """Tune on the pool ``X`` (+ ``unlabelled``) and its ``images`` (+ ``unlabelled_images``); no label is read
        (``y`` is only validated, as the estimator contract asks)."""
        self._check_params()
        X, _ = self._training_rows(X, y, "nola")
        backbone = self.backbone
        if int(self.n_prompts) > 0:
            try:
                backbone.image_tower()
            except UnsupportedOperationError as exc:
                raise UnsupportedOperationError(f"nola: visual prompts need a transformer image tower ({exc}); use "
                                                "n_prompts=0 to train the linear head alone") from None
        encoder = None
        if self.dino_checkpoint is not None:  # before any work: a bad file is answered at once
            config = backbone.preprocess_config
            encoder = load_dino(self.dino_checkpoint, self.dino_arch, config.get("mean", (0.48145466, 0.4578275,
                                0.40821073)), config.get("std", (0.26862954, 0.26130258, 0.27577711)))
        else:
            warnings.warn("nola: no dino_checkpoint: the alignment head reads CLIP's own image features, not a "
                          "self-supervised encoder's", stacklevel=2)
        pool_features, pool = self._pool(X, unlabelled, images, unlabelled_images)
        pool_rows = np.arange(len(pool_features))
        if self.max_unlabelled is not None and len(pool_rows) > int(self.max_unlabelled):
            pool_rows = np.sort(np.random.default_rng(int(self.random_state)).choice(
                len(pool_rows), int(self.max_unlabelled), replace=False))
            pool_features, pool = pool_features[pool_rows], pool.take(pool_rows)
        n_classes = len(self.class_names)
        scale = self._scale()

        # stage 1: the text classifier and its top-k pseudolabels
        text, failures = self.text_weights()
        logits = scale * (pool_features.astype(np.float64) @ np.asarray(text, np.float64))
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        k = int(self.k) if self.k is not None else find_k(len(pool), n_classes)
        rows, labels = (authors_top_k(probs, k) if self.selection == "authors"
                        else select_top_k(probs, k, rule="balanced"))
        if len(rows) == 0:
            raise CliplabError("nola: no pseudolabel selected (empty pool)")

        # stage 2: the alignment head on the SSL features of the selected rows, then a label for every pool row
        ssl = self._encode(encoder, pool) if encoder is not None else pool_features
        head = self._train_alignment(ssl, rows, labels, n_classes)
        with torch.no_grad():
            student_labels = head(torch.from_numpy(ssl)).argmax(dim=1).numpy().astype(np.int64)

        # stage 3: prompts + linear head on strong views of every pool image, labelled by the alignment head
        student, norms = backbone, []
        if self.train_norms:  # the authors also train the image tower's norm layers: on a derived copy
            student = backbone.derive("nola-train", trainable=False)
            norms = norm_parameters(student)
            for _, param in norms:
                param.requires_grad_(True)
        module = NolaModule(student, torch.from_numpy(np.ascontiguousarray(text.T)).to(backbone.device), scale,
                            self._initial_prompts().to(backbone.device) if int(self.n_prompts) > 0 else None, norms)
        final_loss = self._train_student(module, pool, student_labels, pool_features)
        self.norm_names_ = [name for name, _ in norms]
        self.norms_ = np.ascontiguousarray(np.concatenate(
            [p.detach().float().cpu().numpy().ravel() for _, p in norms]) if norms else np.zeros(0), np.float32)

        self.text_weights_ = np.ascontiguousarray(text, dtype=np.float32)
        self.weights_ = np.ascontiguousarray(module.weight.detach().float().cpu().numpy().T, dtype=np.float32)
        width = int(backbone.image_tower().width) if module.visual is not None else 0
        self.vis_ctx_ = (np.ascontiguousarray(module.visual.detach().float().cpu().numpy(), dtype=np.float32)
                         if module.visual is not None else np.zeros((0, width), np.float32))
        self.backbone_ = self.rebuild_backbone(backbone)
        layers = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
        self.align_w1_, self.align_b1_, self.align_w2_, self.align_b2_ = (
            t.detach().float().cpu().numpy() for t in (layers[0].weight, layers[0].bias, layers[1].weight,
                                                       layers[1].bias))
        self.pseudo_rows_, self.pseudo_labels_ = pool_rows[rows], labels
        self.student_labels_ = student_labels
        self.k_ = int(k)
        self.pool_size_ = int(len(pool))
        self.label_agreement_ = float(np.mean(student_labels == probs.argmax(axis=1)))
        self.ssl_encoder_ = f"timm:{self.dino_arch}" if encoder is not None else "clip"
        self.llm_failures_ = dict(failures)
        self.final_loss_ = final_loss
        self.logit_scale_ = scale
        self.classes_ = np.arange(n_classes)
        self.n_features_in_ = X.shape[1]
        return self

    def _initial_prompts(self) -> torch.Tensor:
        """VPT's uniform start, seeded: +-sqrt(6 / (3 * patch^2 + width)) (their ``val``, patch 16 hard-coded there)."""
        width = int(self.backbone.image_tower().width)
        patch = getattr(getattr(self.backbone.model, "visual", None), "patch_size", (16, 16))
        patch = tuple(patch) if isinstance(patch, (list, tuple)) else (int(patch), int(patch))
        bound = math.sqrt(6.0 / float(3 * patch[0] * patch[1] + width))
        generator = torch.Generator().manual_seed(int(self.random_state) + 1)
        return (torch.rand(int(self.n_prompts), width, generator=generator) * 2 - 1) * bound

    def _identity(self, stage: str, *arrays) -> str:
        digest = hashlib.sha256()
        for part in arrays:
            digest.update(np.ascontiguousarray(part).tobytes())
        params = {k: v for k, v in self.get_params(deep=False).items()
                  if k not in ("backbone", "cache_dir", "checkpoint_dir", "progress")}
        return json.dumps({"method": "nola", "stage": stage, "data": digest.hexdigest()[:16], "params": params,
                           "model_id": self.backbone.model_id}, sort_keys=True, default=str)

    def _checkpoints(self, stage: str) -> str | None:
        return None if self.checkpoint_dir is None else str(Path(self.checkpoint_dir) / stage)

    def _train_alignment(self, ssl: np.ndarray, rows: np.ndarray, labels: np.ndarray, n_classes: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.random_state))
            head = AlignmentHead(ssl.shape[1], n_classes, int(self.align_hidden))
        epochs = int(self.align_epochs)
        if epochs == 0:
            return head.eval()
        feats, targets = torch.from_numpy(ssl[rows].astype(np.float32)), torch.from_numpy(labels)
        n, batch, seed = len(rows), int(self.align_batch_size), int(self.random_state)

        def data(epoch: int) -> list[dict]:  # torch's DataLoader(shuffle=True): the last smaller batch kept
            order = torch.from_numpy(np.random.default_rng([seed, 2, int(epoch)]).permutation(n))
            return [{"features": feats[order[s:s + batch]], "labels": targets[order[s:s + batch]]}
                    for s in range(0, n, batch)]

        settings = TrainSettings(
            epochs=epochs, lr=float(self.align_lr), optimizer="adamw", weight_decay=0.0, schedule="constant",
            seed=seed, device="cpu", progress=bool(self.progress), desc="nola alignment head",
            checkpoint_dir=self._checkpoints("align"), checkpoint_seconds=60.0 if self.checkpoint_dir else 0.0,
            identity=self._identity("align", feats.numpy(), labels))
        run_training(head, AlignObjective(), data, settings)
        return head.cpu().eval()

    def _strong(self, picture, size: int, rng: np.random.Generator):
        """Their strong view (``get_random_transform``), seeded by ``rng``."""
        import torchvision.transforms as T
        from PIL import ImageFilter

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(rng.integers(0, 2**31 - 1)))
            view = T.Compose([
                T.RandomResizedCrop(size, scale=(0.2, 1.0)),
                T.RandomHorizontalFlip(),
                T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                T.RandomPerspective(distortion_scale=0.2, p=0.5, interpolation=T.InterpolationMode.BICUBIC),
                T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)])(picture)
        radius = float(rng.uniform(*BLUR_SIGMA)) * size / 224
        return view.filter(ImageFilter.GaussianBlur(radius=radius))

    def _train_student(self, module: NolaModule, pool: _Pool, labels: np.ndarray, pool_features) -> float | None:
        """Stage 3 through the one loop; the last step's loss (None without training)."""
        epochs = int(self.max_epoch)
        if epochs == 0:
            return None
        backbone, preprocess = self.backbone, self.backbone.preprocess
        size, seed, augment = self._input_size(), int(self.random_state), bool(self.augment)
        n, batch = len(pool), int(self.batch_size)
        stop = n - n % batch if n >= batch else n  # Dassl's drop_last where the set holds a full batch
        targets = torch.from_numpy(labels)

        def make(rows: np.ndarray, epoch: int) -> dict:
            pictures = []
            for i in rows.tolist():
                picture = pool.picture(i)
                if augment:
                    picture = self._strong(picture, size, np.random.default_rng([seed, int(epoch), int(i)]))
                pictures.append(preprocess(picture))
            return {"images": torch.stack(pictures), "labels": targets[torch.from_numpy(rows)]}

        def data(epoch: int, start: int = 0) -> LazyBatches:
            order = np.random.default_rng([seed, 3, int(epoch)]).permutation(n)
            return LazyBatches([order[s:s + batch] for s in range(start * batch, stop, batch)],
                               lambda rows: make(rows, epoch))

        model = backbone.model
        frozen = [(p, p.requires_grad) for p in model.parameters()]
        model.requires_grad_(False)  # only the prompts and the linear head train
        settings = TrainSettings(
            epochs=epochs, lr=float(self.lr), optimizer="adamw", weight_decay=float(self.weight_decay),
            schedule="constant", seed=seed, device=str(backbone.device), progress=bool(self.progress),
            desc="nola student", checkpoint_dir=self._checkpoints("student"),
            checkpoint_every=len(range(0, stop, batch)) if self.checkpoint_dir else 0,  # after every epoch
            checkpoint_seconds=60.0 if self.checkpoint_dir else 0.0,
            identity=self._identity("student", pool_features, labels))
        try:
            result = run_training(module, NolaObjective(float(self.label_smoothing)), data, settings)
        finally:
            for param, flag in frozen:
                param.requires_grad_(flag)
        return float(result.last_loss)

    # ------------------------------------------------------------------ prediction

    def rebuild_backbone(self, backbone: Backbone) -> Backbone:
        """A derived copy of ``backbone`` with the learned visual prompts attached and, after ``train_norms``, the
        learned norm-layer parameters (``backbone_``)."""
        derived = backbone.derive("nola", trainable=False)
        names = [str(n) for n in getattr(self, "norm_names_", [])]
        if names:
            found = dict(norm_parameters(derived))
            values = np.asarray(self.norms_, dtype=np.float32).reshape(-1)
            if any(n not in found for n in names) or values.size != sum(found[n].numel() for n in names):
                raise CliplabError(f"nola: {backbone.info.name} does not have the norm layers this head trained; "
                                   "load it with the model it was fitted on")
            with torch.no_grad():
                offset = 0
                for name in names:
                    param = found[name]
                    param.copy_(torch.from_numpy(values[offset:offset + param.numel()]).view_as(param))
                    offset += param.numel()
        prompts = np.asarray(self.vis_ctx_, dtype=np.float32)
        return derived.set_prompts(image=[torch.from_numpy(prompts)] if len(prompts) else [])

    def logits(self, X) -> np.ndarray:
        """``logit_scale_ * X @ weights_`` (n, C) on features of ``backbone_``."""
        X = self._checked(X)
        return self.logit_scale_ * (X @ self.weights_)

    def with_classes(self, class_names: Sequence[str]) -> NoLA:
        """A fitted head for other class names: the learned prompts with the new names' text classifier (the
        linear head is class-specific)."""
        check_is_fitted(self)
        head = self._fitted_copy(class_names)
        text, failures = head.text_weights()
        head.text_weights_ = head.weights_ = np.ascontiguousarray(text, dtype=np.float32)
        head.llm_failures_ = dict(failures)
        head.classes_ = np.arange(len(head.class_names))
        return head

    def fit_summary(self) -> dict:
        return {"ssl_encoder": self.ssl_encoder_, "k": self.k_, "pool": self.pool_size_,
                "pseudolabels": int(len(self.pseudo_rows_)), "label_agreement": self.label_agreement_,
                "prompts": int(len(self.vis_ctx_)), "epochs": int(self.max_epoch),
                "final_loss": self.final_loss_,
                "llm_failures": self.llm_failures_}
