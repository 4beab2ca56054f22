"""GOPro: prompts conditioned on per-layer style and content of the image, with self-supervised terms (paper 26)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils.validation import check_is_fitted

from ..errors import CliplabError, DatasetError, UnsupportedOperationError
from ..features.views import Augmentation
from ..models.backbone import Backbone
from ..train.engine import register_objective, run_training
from ..train.prompts import LazyBatches, PromptLearner, PromptTrainingMixin, causal_length, initial_context
from .base import FEWSHOT_SKIPS, ClipHead, ZeroShotLogitsMixin
from .registry import register

SIGMA_EPS = 0.000000023  # AdaIN_trans.sigma's constant under the square root
CROP_SCALE = (0.08, 1.0)  # Dassl's random_resized_crop (their train transform) and MoCo v3's crop
MAX_TOKENS = 1 << 17  # prompts x positions per text pass when scoring many images


def layer_statistics(backbone: Backbone, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features (n, d) L2-normalised, stats (n, J, 2, width))`` through the frozen image tower without gradients:
    for each block j's output tokens (class token included, as their ``Transformer.forward`` stacks them) the mean
    over tokens and AdaIN's sigma, ``sqrt((sum (x - mu)^2 + 2.3e-8) / L)``."""
    tower = backbone.image_tower()
    with torch.no_grad():
        x, state = tower.begin(pixels.to(backbone.device), None)
        stats = []
        for j in range(tower.depth):
            x = tower.block(j, x, state)
            mu = x.mean(dim=1)
            sigma = torch.sqrt(((x - mu[:, None]) ** 2).sum(dim=1).add(SIGMA_EPS) / x.shape[1])
            stats.append(torch.stack([mu, sigma], dim=1))
        features = F.normalize(tower.end(x, state), dim=-1)
    return features.float(), torch.stack(stats, dim=1).float()


class StyleContentPrompts(PromptLearner):
    """CoOp's context (``train.prompts.PromptLearner``) shifted per image by ``bias(stats)``: per block j a style
    projection of the mean of (mu_j, sigma_j) and a content projection of the token mean mu_j (Linear image width ->
    text width, one per block), averaged, then mixed over the blocks by ``rho`` (Linear J -> 1); the same bias is
    added to every context token. ``simproj`` (Linear d -> d + BatchNorm1d) maps image features for the contrastive
    term. Zero projections give a zero bias: CoOp's prompt."""

    def __init__(self, backbone: Backbone, ctx, prefix, suffix, tokens, logit_scale: float, length: int | None,
                 depth: int, image_width: int, generator: torch.Generator):
        super().__init__(backbone, ctx, prefix, suffix, tokens, logit_scale, length)
        width = int(ctx.shape[1])
        dim = int(backbone.embed_dim)

        def linear(n_in: int, n_out: int) -> torch.nn.Linear:
            layer = torch.nn.Linear(n_in, n_out)
            bound = 1.0 / np.sqrt(n_in)  # PyTorch's default init, drawn from the head's generator
            with torch.no_grad():
                layer.weight.copy_((torch.rand(n_out, n_in, generator=generator) * 2 - 1) * bound)
                layer.bias.copy_((torch.rand(n_out, generator=generator) * 2 - 1) * bound)
            return layer

        self.style = torch.nn.ModuleList([linear(image_width, width) for _ in range(depth)])
        self.content = torch.nn.ModuleList([linear(image_width, width) for _ in range(depth)])
        self.rho = linear(depth, 1)
        self.simproj = linear(dim, dim)
        self.simbn = torch.nn.BatchNorm1d(dim)

    def bias(self, stats: torch.Tensor) -> torch.Tensor:
        """(B, text width) from ``stats`` (B, J, 2, image width)."""
        mu, sigma = stats[:, :, 0], stats[:, :, 1]
        style = torch.stack([layer((mu[:, j] + sigma[:, j]) / 2) for j, layer in enumerate(self.style)], dim=1)
        content = torch.stack([layer(mu[:, j]) for j, layer in enumerate(self.content)], dim=1)
        mixed = (style + content) / 2  # (B, J, width): their frg pooling over (style, content)
        return self.rho(mixed.transpose(1, 2)).squeeze(-1)

    def conditioned(self, features: torch.Tensor, stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits (B, C), text features (B, C, d))`` with each image's own prompts."""
        text = self.text_features(self.bias(stats))
        return self.logit_scale * torch.einsum("bd,bcd->bc", features.to(text.dtype), text), text

    def projected(self, features: torch.Tensor) -> torch.Tensor:
        return self.simbn(self.simproj(features))


def simclr_loss(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Their ``SIMCLRLoss`` on one process: L2-normalised views, logits ab/aa and ba/bb over tau with the self
    pairs masked by 1e9, cross-entropy to the diagonal, averaged over both directions."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    labels = torch.arange(len(a), device=a.device)
    mask = F.one_hot(labels, len(a)).to(a.dtype) * 1e9
    aa, bb = a @ a.T / temperature - mask, b @ b.T / temperature - mask
    ab, ba = a @ b.T / temperature, b @ a.T / temperature
    loss_a = F.cross_entropy(torch.cat([ab, aa], dim=1), labels)
    loss_b = F.cross_entropy(torch.cat([ba, bb], dim=1), labels)
    return (loss_a + loss_b) / 2


def consistency_loss(text: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
    """Their ``sem_loss``: the sum of the MSEs between the original view's prompted text features and each other
    view's; zero for identical views."""
    return sum((F.mse_loss(text, other) for other in others), torch.zeros((), device=text.device))


@register_objective("gopro")
class GOProObjective:
    """``CE + consistency_weight * (MSE(t, t_moco) + MSE(t, t_augmix)) + contrastive_weight * SimCLR(moco)`` for a batch
    ``{"images", "moco", "augmix": (b, 3, H, W) views, "labels"}`` (their ``GOProLoss``: 1 and 0.1)."""

    def __init__(self, consistency_weight: float = 1.0, contrastive_weight: float = 0.1, temperature: float = 0.1,
                 losses: list | None = None):
        self.consistency_weight, self.contrastive_weight = consistency_weight, contrastive_weight
        self.temperature, self.losses = temperature, losses

    def __call__(self, module: StyleContentPrompts, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        backbone = module.backbone
        features, stats = layer_statistics(backbone, batch["images"])
        logits, text = module.conditioned(features, stats)
        labels = batch["labels"]
        loss = F.cross_entropy(logits, labels)
        logs = {"acc": float((logits.argmax(dim=1) == labels).float().mean())}
        if self.consistency_weight or self.contrastive_weight:
            moco_features, moco_stats = layer_statistics(backbone, batch["moco"])
            moco_text = module.text_features(module.bias(moco_stats))
            _, augmix_stats = layer_statistics(backbone, batch["augmix"])
            augmix_text = module.text_features(module.bias(augmix_stats))
            loss = loss + self.consistency_weight * consistency_loss(text, moco_text, augmix_text)
            if len(features) > 1:  # BatchNorm needs two rows
                contrast = simclr_loss(module.projected(features), module.projected(moco_features), self.temperature)
                loss = loss + self.contrastive_weight * contrast
        if self.losses is not None:
            self.losses.append(float(loss.detach()))
        return loss, logs

    def param_groups(self, module: torch.nn.Module, weight_decay: float) -> list[dict]:
        return [{"params": [p for p in module.parameters() if p.requires_grad], "weight_decay": weight_decay}]


PROJECTORS = ("style", "content", "rho")


@register("gopro", family="encoder", paper=26, needs_train=True, needs=("images",), gives=("class_weights",))
class GOPro(PromptTrainingMixin, ZeroShotLogitsMixin, ClipHead):
    """GOPro: CoOp's context shifted per image by projections of the image tower's per-layer style and content.

    Paper 26 in ../shared/papers.md (Singha et al., "GOPro: Generate and Optimize Prompts in CLIP using
    Self-Supervised Learning", BMVC 2023), read against the authors' code, github.com/mainaksingha01/GOPro
    (``trainers/gopro.py``: ``style_projector``, ``content_projector``, ``PromptLearner``, ``SIMCLRLoss``,
    ``GOProLoss``; ``clip/model.py`` returning every block's tokens; ``configs/trainers/GOPro/vit_b16.yaml``).

    Prompt: ``[SOS] (v_1 + b(x)) .. (v_M + b(x)) "{class}." [EOS]``, v the context (init "a photo of a", M = its
    tokens, as CoOp here), b(x) = rho([ (S_j((mu_j + sigma_j) / 2) + C_j(mu_j)) / 2 ]_j) where mu_j and sigma_j are
    the mean and AdaIN standard deviation over the tokens of block j's output (image tower run without gradients),
    S_j, C_j Linear image width -> text width, rho Linear J -> 1. Logits ``logit_scale * f(x) . t_c(x)``.

    Loss per batch (their ``GOProLoss``): cross-entropy on the training view + ``consistency_weight`` (1) x the MSE
    between the prompted text features of the training view and those of a MoCo-v3 view (random resized crop
    0.08-1, colour jitter 0.4/0.4/0.2/0.1 with p 0.8, grayscale p 0.2, Gaussian blur sigma 0.1-2, flip) plus the same
    for an AugMix view (torchvision's ``AugMix``) + ``contrastive_weight`` (0.1) x SimCLR (tau 0.1) between
    ``simproj`` of the training and MoCo views' image features. The image tower is frozen, so the SimCLR term trains
    only ``simproj`` (Linear + BatchNorm), which scores nothing: as in their code it does not move the prompts.

    Training (``run_training``, objective "gopro"), their config: SGD lr 0.002, momentum 0.9, weight decay 5e-4,
    ``max_epoch`` 50, batch 4 (Dassl's ``drop_last``), one constant warm-up epoch at 1e-5 then cosine; the training
    view a random resized crop (0.08-1) and flip; every random draw seeded by (``random_state``, epoch, item).

    Prediction: the prompts depend on the image's per-layer statistics, which cached features do not carry.
    :meth:`logits_images` (images) is GOPro's prediction; ``logits(X)`` on features (what the few-shot protocol and
    the contract give) uses the mean bias over the training images (``mean_bias_``), CoOp's form with a shifted
    context: a departure, said in every summary (``fit_summary()["feature_logits"]``).

    Fitted state: ``ctx_``, the projections ``style_weight_`` (J, text width, image width), ``style_bias_``,
    ``content_weight_``, ``content_bias_``, ``rho_weight_`` (1, J), ``rho_bias_``, ``mean_bias_``, ``weights_`` (d, C)
    (the text features with the mean bias), ``logit_scale_``, ``epochs_``, ``training_loss_``, ``text_positions_``.

    Departures from the authors' code, and why:

    - Widths: their projections are Linear(768, 512) x 12 and their ``frg`` pooling averages style and content only
      because the image output width equals the text width of ViT-B/16; here the towers' own widths and depth, the
      average written out.
    - Their AugMix view is computed for the first image of the batch only (``augmixtrans`` returns inside its loop:
      B AugMix views of image 0); here one AugMix view of each image.
    - Their MoCo view is drawn from the already normalised tensor turned back into a PIL image; here from the image.
    - ``meta_net`` is built in their learner but never used; it is left out.
    - Precision float32 (their fp16); ``logit_scale`` defaults to the model's; draws seeded per item instead of the
      global RNG, so runs repeat bit for bit on the CPU.
    - ResNet image towers are refused in one line (their code reads ViT tokens; its ResNet branch feeds 4 stages to
      12 projections of width 768 and cannot run).
    """

    _contract_skips = dict(FEWSHOT_SKIPS)

    def __init__(
        self,
        backbone: Backbone,
        class_names: Sequence[str],
        cache_dir: str | Path | None = None,
        n_ctx: int | None = None,
        ctx_init: str | None = "a photo of a",
        max_epoch: int = 50,
        lr: float = 0.002,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        warmup_epochs: int = 1,
        warmup_lr: float = 1e-5,
        batch_size: int = 4,
        consistency_weight: float = 1.0,
        contrastive_weight: float = 0.1,
        temperature: float = 0.1,
        augment: bool = True,
        logit_scale: float | None = None,
        random_state: int = 1,
        truncate: bool = True,
        checkpoint_dir: str | Path | None = None,
        progress: bool = False,
    ):
        self.backbone = backbone
        self.class_names = class_names
        self.cache_dir = cache_dir
        self.n_ctx = n_ctx
        self.ctx_init = ctx_init
        self.max_epoch = max_epoch
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.warmup_epochs = warmup_epochs
        self.warmup_lr = warmup_lr
        self.batch_size = batch_size
        self.consistency_weight = consistency_weight
        self.contrastive_weight = contrastive_weight
        self.temperature = temperature
        self.augment = augment
        self.logit_scale = logit_scale
        self.random_state = random_state
        self.truncate = truncate
        self.checkpoint_dir = checkpoint_dir
        self.progress = progress

    def _check_params(self) -> None:
        super()._check_params()
        for key in ("consistency_weight", "contrastive_weight", "temperature"):
            value = float(getattr(self, key))
            if not np.isfinite(value) or value < 0 or (key == "temperature" and value == 0):
                raise CliplabError(f"GOPro: {key} must be finite and {'> 0' if key == 'temperature' else '>= 0'}")

    def _identity(self, epochs: int) -> dict:
        return {**super()._identity(epochs), "consistency_weight": float(self.consistency_weight),
                "contrastive_weight": float(self.contrastive_weight), "temperature": float(self.temperature),
                "augment": bool(self.augment)}

    def image_tower(self):
        try:
            return self.backbone.image_tower()
        except UnsupportedOperationError as exc:
            raise UnsupportedOperationError(f"GOPro reads the per-layer tokens of the image tower and needs a "
                                            f"transformer there: {exc}") from None

    def build_learner(self) -> StyleContentPrompts:
        """The learner at its start (the random parts seeded by ``random_state``)."""
        self._check_params()
        backbone = self.backbone
        image = self.image_tower()
        ctx, tokens, embedded, start = initial_context(backbone, self.class_names, self.n_ctx, self.ctx_init,
                                                       self.random_state, "GOPro")
        scale = self.logit_scale if self.logit_scale is not None else backbone.logit_scale
        length = causal_length(backbone, embedded, tokens) if self.truncate else None
        generator = torch.Generator().manual_seed(int(self.random_state) + 1)
        learner = StyleContentPrompts(backbone, ctx, embedded[:, :start], embedded[:, start + len(ctx):], tokens,
                                      scale, length, image.depth, image.width, generator)
        return learner.to(backbone.device)

    # ------------------------------------------------------------------ views

    def views(self, picture, epoch: int, item: int) -> dict[str, torch.Tensor]:
        """The three views of one training image for (epoch, item), seeded by (random_state, epoch, item)."""
        import torchvision.transforms as T

        backbone = self.backbone
        if not self.augment:
            plain = backbone.preprocess(picture)
            return {"images": plain, "moco": plain, "augmix": plain}
        size = backbone.preprocess_config.get("size", 224)
        size = int(size[0] if isinstance(size, (list, tuple)) else size)
        seed = [int(self.random_state), int(epoch), int(item)]
        rng = np.random.default_rng(seed)
        train = Augmentation(size=size, scale=CROP_SCALE)(picture, rng)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(rng.integers(0, 2**31 - 1)))
            moco = T.Compose([
                T.RandomResizedCrop(size, scale=CROP_SCALE),
                T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                T.RandomGrayscale(p=0.2),
                T.GaussianBlur(kernel_size=max(3, (size // 10) | 1), sigma=(0.1, 2.0)),
                T.RandomHorizontalFlip()])(picture)
            augmix = T.AugMix()(T.Resize(size)(picture) if min(picture.size) != size else picture)
        return {"images": backbone.preprocess(train), "moco": backbone.preprocess(moco),
                "augmix": backbone.preprocess(augmix)}

    def epoch_data(self, pictures: list, y: np.ndarray):
        n, batch = len(pictures), int(self.batch_size)
        stop = n - n % batch if n >= batch else n
        labels = torch.from_numpy(y.astype(np.int64))

        def make(rows, epoch):
            views = [self.views(pictures[int(i)], epoch, int(i)) for i in rows]
            out = {k: torch.stack([v[k] for v in views]) for k in ("images", "moco", "augmix")}
            out["labels"] = labels[rows]
            return out

        def data(epoch: int) -> LazyBatches:
            order = np.random.default_rng([int(self.random_state), int(epoch)]).permutation(n)
            return LazyBatches([order[s:s + batch] for s in range(0, stop, batch)], lambda r: make(r, epoch))

        return data

    # ------------------------------------------------------------------ fitting

    def fit(self, X, y, images=None):
        """Learn the context and projections on the training ``images`` (rows of ``X``, labels ``y``)."""
        self._check_params()
        X, y = self._training_rows(X, y, "GOPro")
        backbone = self.backbone
        learner = self.build_learner()
        pictures = _pictures(images, len(X))
        epochs = int(self.max_epoch)
        losses: list[float] = []
        holder = _Holder(losses)
        frozen = [(p, p.requires_grad) for p in backbone.model.parameters()]
        backbone.model.requires_grad_(False)
        try:
            if epochs > 0:
                objective = GOProObjective(float(self.consistency_weight), float(self.contrastive_weight),
                                           float(self.temperature), holder)
                run_training(learner, objective, self.epoch_data(pictures, y),
                             self.train_settings(epochs, np.asarray(X, np.float32)[None], y))
            learner.eval()
            plain = torch.stack([backbone.preprocess(p) for p in pictures])
            self._store(learner, plain)
        finally:
            for param, flag in frozen:
                param.requires_grad_(flag)
        self.classes_ = np.arange(len(self.class_names))
        self.n_features_in_ = X.shape[1]
        self.epochs_ = epochs
        self.training_loss_ = _epoch_means(losses, epochs)
        self.text_positions_ = int(learner.length or learner.tokens.shape[1])
        return self

    def _store(self, learner: StyleContentPrompts, plain: torch.Tensor) -> None:
        with torch.no_grad():
            self.ctx_ = learner.ctx.detach().float().cpu().numpy()
            for name in ("style", "content"):
                layers = getattr(learner, name)
                setattr(self, f"{name}_weight_", np.stack([m.weight.detach().cpu().numpy() for m in layers]))
                setattr(self, f"{name}_bias_", np.stack([m.bias.detach().cpu().numpy() for m in layers]))
            self.rho_weight_ = learner.rho.weight.detach().cpu().numpy()
            self.rho_bias_ = learner.rho.bias.detach().cpu().numpy()
            biases = [learner.bias(layer_statistics(self.backbone, plain[s:s + 64])[1])
                      for s in range(0, len(plain), 64)]
            self.mean_bias_ = torch.cat(biases).mean(dim=0).float().cpu().numpy()
            text = learner.text_features(torch.from_numpy(self.mean_bias_)[None].to(learner.ctx.device))[0]
            self.weights_ = np.ascontiguousarray(text.float().cpu().numpy().T, dtype=np.float32)
        self.logit_scale_ = float(learner.logit_scale)

    def fitted_learner(self) -> StyleContentPrompts:
        """A learner for ``class_names`` holding the fitted context and projections."""
        check_is_fitted(self, "ctx_")
        learner = self.build_learner()
        if tuple(learner.ctx.shape) != tuple(np.shape(self.ctx_)) or len(learner.style) != len(self.style_weight_):
            raise CliplabError("GOPro: the fitted context and projections do not fit this model and class names")
        with torch.no_grad():
            learner.ctx.copy_(torch.from_numpy(np.asarray(self.ctx_, dtype=np.float32)))
            for name in ("style", "content"):
                weights, biases = getattr(self, f"{name}_weight_"), getattr(self, f"{name}_bias_")
                for layer, w, b in zip(getattr(learner, name), weights, biases, strict=True):
                    layer.weight.copy_(torch.from_numpy(np.asarray(w, dtype=np.float32)))
                    layer.bias.copy_(torch.from_numpy(np.asarray(b, dtype=np.float32)))
            learner.rho.weight.copy_(torch.from_numpy(np.asarray(self.rho_weight_, dtype=np.float32)))
            learner.rho.bias.copy_(torch.from_numpy(np.asarray(self.rho_bias_, dtype=np.float32)))
        learner.logit_scale = float(self.logit_scale_)
        return learner.eval()

    def with_classes(self, class_names: Sequence[str]) -> GOPro:
        """A fitted copy scoring ``class_names`` with the learnt context and projections."""
        check_is_fitted(self, "ctx_")
        head = self._fitted_copy(class_names)
        learner = head.fitted_learner()
        with torch.no_grad():
            text = learner.text_features(torch.from_numpy(np.asarray(self.mean_bias_, np.float32))[None])[0]
        head.weights_ = np.ascontiguousarray(text.float().cpu().numpy().T, dtype=np.float32)
        head.classes_ = np.arange(len(head.class_names))
        head.text_positions_ = int(learner.length or learner.tokens.shape[1])
        return head

    # ------------------------------------------------------------------ prediction

    def logits(self, X) -> np.ndarray:
        """``logit_scale_ * X @ weights_`` (n, C): the context shifted by the mean training bias (features carry no
        per-layer statistics; :meth:`logits_images` is GOPro's own prediction)."""
        X = self._checked(X)
        return self.logit_scale_ * (X @ self.weights_)

    def logits_images(self, images, batch_size: int = 32) -> np.ndarray:
        """GOPro's prediction (n, C): each image's prompts from its own per-layer statistics. ``images``: a dataset
        (``load_image``) or preprocessed pixels (n, 3, H, W)."""
        learner = self.fitted_learner()
        backbone = self.backbone
        n = len(images)
        chunk = max(1, min(batch_size, MAX_TOKENS // (len(self.class_names) * self.text_positions_)))
        out = np.empty((n, len(self.class_names)), dtype=np.float32)
        with torch.no_grad():
            for start in range(0, n, chunk):
                if isinstance(images, torch.Tensor):
                    pixels = images[start:start + chunk]
                else:
                    pixels = torch.stack([backbone.preprocess(images.load_image(i).convert("RGB"))
                                          for i in range(start, min(n, start + chunk))])
                features, stats = layer_statistics(backbone, pixels)
                out[start:start + chunk] = learner.conditioned(features, stats)[0].float().cpu().numpy()
        return out

    def fit_summary(self) -> dict:
        return {"n_ctx": int(len(self.ctx_)), "ctx_init": self.ctx_init, "epochs": self.epochs_,
                "layers": int(len(self.style_weight_)),
                "final_loss": self.training_loss_[-1] if self.training_loss_ else None,
                "feature_logits": "context shifted by the mean training bias (logits_images: per-image prompts)"}


class _Holder:
    """Step losses (an object the loop does not copy)."""

    def __init__(self, values: list):
        self.values = values

    def append(self, value: float) -> None:
        self.values.append(value)


def _pictures(images, n: int) -> list:
    if images is None:
        raise CliplabError("GOPro trains through the image tower: fit(X, y, images=...) needs the training images "
                           "(a dataset aligned with the rows of X)")
    if len(images) != n:
        raise DatasetError(f"GOPro: {len(images)} training images for {n} feature rows")
    out = []
    for i in range(n):
        try:
            out.append(images.load_image(i).convert("RGB"))
        except Exception as exc:  # noqa: BLE001 - any decoder failure is the item's
            raise DatasetError(f"GOPro: training image {images.item_id(i)} cannot be read: "
                               f"{' '.join(str(exc).split())}") from None
    return out


def _epoch_means(losses: list[float], epochs: int) -> list[float]:
    if not losses or epochs <= 0 or len(losses) % epochs:
        return [float(np.mean(losses))] if losses else []
    per = len(losses) // epochs
    return [float(np.mean(losses[e * per:(e + 1) * per])) for e in range(epochs)]
