"""CLIPN: teach CLIP to say "no" (paper 18; authors' code github.com/xmed-lab/CLIPN).

A "no" text encoder — a trainable copy of the CLIP text tower (``Backbone.derive``), initialised from CLIP as
the authors' ``factory.py`` copies ``transformer``/``token_embedding``/``positional_embedding``/``ln_final``/
``text_projection`` into their ``*_no`` twins — plus ``n_prompts`` learnable "no" prompts. The image tower,
the original text tower and the logit scale stay frozen (the authors train only parameters named ``*_no``).

Following the authors' ``model.py`` where it is more specific than the paper: each "no" prompt is a full
(context_length, width) tensor, initialised to zero and *added* to the token embeddings at every position
(not prepended tokens); in training each caption gets one of the ``n_prompts`` prompts or their mean, drawn
uniformly (``n_prompts + 1`` choices); at inference the mean prompt is used. Losses (``loss.py``):
ITBO (eq. 4-5): per image-text pair softmax over [yes, no] logits; matched pairs should say yes, every
unmatched pair no, the two terms averaged over N and N^2 - N pairs; TSO (eq. 7, L2 mode):
2 - sqrt(2 - 2 cos(t, t_no) + 1e-4); total = 0.5 (ITBO_yes + ITBO_no + TSO) (``train.py``).

Departures: AdamW (weight decay ``weight_decay``, 0.2 as the authors, not on gains/biases/prompts) at a
constant learning rate by default (the authors use warmup + cosine over 10 CC3M epochs: ``schedule="cosine"``,
``warmup_steps``); training runs on ``train.engine.run_training`` (objective ``clipn``); one caption per image drawn
at random each step where a dataset has several (COCO); image features are computed once by the frozen
tower (``features.embed_images``), which the frozen tower makes exact. The authors' single-GPU branch of
``ClipLoss`` leaves ``logits_per_image_no`` undefined; we compute it as their multi-GPU branch does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CliplabError, ModelLoadError
from ..fileio import atomic_write, atomic_write_text, digest
from ..models.backbone import Backbone

FORMAT = "cliplab-clipn-1"
TSO_EPS = 1e-4  # the authors' epsilon "to get rid of infinity gradient"


# -- losses (authors' loss.py) ---------------------------------------------------------------
def itbo_loss(image_features: torch.Tensor, text_features: torch.Tensor, text_features_no: torch.Tensor,
              logit_scale: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-text binary-opposite loss (eq. 4-5): (yes term over matched pairs, no term over unmatched pairs).

    All features L2-normalised, row i of the texts captions image i.
    """
    logits_yes = logit_scale * image_features @ text_features.T
    logits_no = logit_scale * image_features @ text_features_no.T
    p = torch.softmax(torch.stack([logits_yes, logits_no], dim=-1), dim=-1)
    n = p.shape[0]
    eye = torch.eye(n, device=p.device, dtype=p.dtype)
    nll = -torch.log(eye * p[..., 0] + (1 - eye) * p[..., 1])
    loss_yes = (eye * nll).sum() / n
    loss_no = ((1 - eye) * nll).sum() / max(n * n - n, 1)
    return loss_yes, loss_no


def tso_loss(text_features: torch.Tensor, text_features_no: torch.Tensor) -> torch.Tensor:
    """Text semantic-opposite loss (eq. 7, the authors' default L2 mode): mean of 2 - ||t - t_no||, in [0, 2]."""
    distance = 2 - 2 * (text_features * text_features_no).sum(-1) + TSO_EPS
    return (2 - torch.sqrt(distance)).mean()


def clipn_loss(image_features, text_features, text_features_no, logit_scale) -> torch.Tensor:
    """0.5 (ITBO_yes + ITBO_no + TSO), the authors' total loss."""
    yes, no = itbo_loss(image_features, text_features, text_features_no, logit_scale)
    return 0.5 * (yes + no + tso_loss(text_features, text_features_no))


# -- model -----------------------------------------------------------------------------------
def _text_parameter_names(no_encoder: Backbone) -> list[str]:
    """Names of the parameters the text tower uses: those reached by a text forward pass from token ids."""
    tokens = no_encoder.tokenize(["a photo"])
    no_encoder.model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        emb = no_encoder.token_embeddings(tokens)
        no_encoder.forward_text_embeddings(emb, tokens, normalize=False).sum().backward()
    names = [n for n, p in no_encoder.model.named_parameters() if p.grad is not None]
    no_encoder.model.zero_grad(set_to_none=True)
    return names


@dataclass
class ClipnModel:
    """The frozen CLIP ``backbone``, the "no" text encoder and its (n_prompts, L, width) "no" prompts."""

    backbone: Backbone
    no_encoder: Backbone
    prompts: torch.nn.Parameter
    text_names: list[str]
    history: list[float] = field(default_factory=list)

    @classmethod
    def init(cls, backbone: Backbone, n_prompts: int = 16) -> ClipnModel:
        """Untrained CLIPN: "no" encoder = CLIP's text tower, prompts zero (the authors' initialisation)."""
        if n_prompts < 1:
            raise ValueError(f"n_prompts must be >= 1; got {n_prompts}")
        no_encoder = backbone.derive("clipn-no", trainable=True)
        names = _text_parameter_names(no_encoder)
        trainable = set(names)
        for name, param in no_encoder.model.named_parameters():
            param.requires_grad_(name in trainable)
        width = no_encoder.token_embeddings(backbone.tokenize(["a"])).shape[-1]
        prompts = torch.nn.Parameter(torch.zeros(n_prompts, backbone.context_length, width, device=backbone.device))
        return cls(backbone, no_encoder, prompts, names)

    @property
    def logit_scale(self) -> float:
        """CLIP's (frozen) temperature, used by the losses and the yes/no logits."""
        return self.backbone.logit_scale

    def forward_no(self, tokens: torch.Tensor, prompt_index: torch.Tensor | None = None) -> torch.Tensor:
        """"No" text features (m, d), normalised; ``prompt_index`` per text in [0, n_prompts], n_prompts = mean.

        None uses the mean prompt (the authors' inference).
        """
        tokens = tokens.to(self.no_encoder.device)
        bank = torch.cat([self.prompts, self.prompts.mean(0, keepdim=True)])
        index = torch.full((len(tokens),), len(bank) - 1) if prompt_index is None else prompt_index
        added = bank[index.to(bank.device)]
        emb = self.no_encoder.token_embeddings(tokens) + added
        return self.no_encoder.forward_text_embeddings(emb, tokens)

    @torch.no_grad()
    def encode_no_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """"No" embeddings of ``texts`` with the mean prompt: (m, d) L2-normalised float32 on the CPU."""
        texts = list(texts)
        out = [self.forward_no(self.backbone.tokenize(texts[s:s + batch_size])).float().cpu()
               for s in range(0, len(texts), batch_size)]
        return torch.cat(out) if out else torch.zeros((0, self.backbone.embed_dim))

    def save(self, folder: str | Path) -> Path:
        """``clipn.json`` (model_id, names, settings) + ``weights.safetensors`` (no-encoder text tower, prompts)."""
        from safetensors.torch import save

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        params = dict(self.no_encoder.model.named_parameters())
        tensors = {f"no.{n}": params[n].detach().cpu().contiguous() for n in self.text_names}
        tensors["prompts"] = self.prompts.detach().cpu().contiguous()
        atomic_write(folder / "weights.safetensors", lambda h: h.write(save(tensors, metadata={"format": FORMAT})))
        record = {"format": FORMAT, "model_id": self.backbone.model_id, "n_prompts": int(self.prompts.shape[0]),
                  "text_names": self.text_names, "history": self.history}
        atomic_write_text(folder / "clipn.json", json.dumps(record, indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | Path, backbone: Backbone) -> ClipnModel:
        """Load a saved CLIPN onto ``backbone``; refuses another model_id. Nothing is unpickled."""
        from safetensors.torch import load

        folder = Path(folder)
        try:
            record = json.loads((folder / "clipn.json").read_text())
            tensors = load((folder / "weights.safetensors").read_bytes())
        except Exception as error:  # OSError, JSON and safetensors' own error types
            raise ModelLoadError(f"{folder}: not a readable CLIPN folder ({error})") from error
        if record.get("format") != FORMAT:
            raise ModelLoadError(f"{folder / 'clipn.json'}: format {record.get('format')!r}, expected {FORMAT!r}")
        if record.get("model_id") != backbone.model_id:
            raise ModelLoadError(f"{folder / 'clipn.json'}: trained on model_id {record.get('model_id')!r}, "
                                 f"not the given backbone {backbone.model_id!r}")
        model = cls.init(backbone, int(record["n_prompts"]))
        if sorted(record["text_names"]) != sorted(model.text_names):
            raise ModelLoadError(f"{folder / 'clipn.json'}: text_names do not match this backbone's text tower")
        params = dict(model.no_encoder.model.named_parameters())
        with torch.no_grad():
            for name in model.text_names:
                params[name].copy_(tensors[f"no.{name}"])
            model.prompts.copy_(tensors["prompts"])
        model.history = list(record.get("history", []))
        return model


# -- inference -------------------------------------------------------------------------------
@torch.no_grad()
def clipn_probabilities(model: ClipnModel, image_features, class_names: Sequence[str],
                        templates: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(p_yes, p_no), each (n, C): CLIP softmax over classes and, per class, softmax([l_yes, l_no])[1].

    Class embeddings average the normalised per-template features, then renormalise (the authors'
    ``merge_yes_no_feature``); logits use CLIP's logit scale (the authors fix 100, CLIP's trained value).
    """
    from ..data.prompts import fill_template, load_templates

    templates = load_templates(templates)  # a built-in set name, a file or a list; {} or {c} placeholders
    names = list(class_names)
    texts = [fill_template(t, c) for t in templates for c in names]
    yes = model.backbone.encode_texts(texts).reshape(len(templates), len(names), -1)
    no = model.encode_no_texts(texts).reshape(len(templates), len(names), -1)
    yes = F.normalize(yes.sum(0), dim=-1)
    no = F.normalize(no.sum(0), dim=-1)
    feats = F.normalize(torch.as_tensor(np.asarray(image_features), dtype=torch.float32), dim=-1)
    logits_yes = model.logit_scale * feats @ yes.T
    logits_no = model.logit_scale * feats @ no.T
    p_yes = torch.softmax(logits_yes, dim=-1)
    p_no = torch.sigmoid(logits_no - logits_yes)  # = softmax([l_yes, l_no])[1]
    return p_yes.numpy().astype(np.float64), p_no.numpy().astype(np.float64)


# -- training --------------------------------------------------------------------------------
def _captions(dataset) -> list[list[str]]:
    captions = getattr(dataset, "captions", None)
    if captions is None:
        raise CliplabError(f"{getattr(dataset, 'name', 'dataset')}: CLIPN needs an image-caption dataset "
                           "(no captions found)")
    lists = [[c] if isinstance(c, str) else [x for x in c if isinstance(x, str) and x.strip()] for c in captions]
    if any(not c for c in lists):
        raise CliplabError(f"{getattr(dataset, 'name', 'dataset')}: item {[bool(c) for c in lists].index(False)} "
                           "has no caption")
    return lists


class ClipnTrainable(torch.nn.Module):
    """What CLIPN trains, as one module for ``train.engine.run_training``: the "no" encoder's model (only its
    text parameters require grad) and the "no" prompts; ``clipn`` is the :class:`ClipnModel` (not a submodule:
    the frozen CLIP it holds is neither trained nor checkpointed)."""

    def __init__(self, clipn: ClipnModel):
        super().__init__()
        self.no = clipn.no_encoder.model
        self.prompts = clipn.prompts
        self.clipn = clipn


def train_clipn(backbone: Backbone, pairs_dataset, steps: int = 100, batch_size: int = 64, lr: float = 1e-5,
                n_prompts: int = 16, seed: int = 0, device: str | torch.device | None = None, *,
                image_features=None, weight_decay: float = 0.2, warmup_steps: int = 0, schedule: str = "constant",
                checkpoint_dir: str | Path | None = None, checkpoint_every: int = 0, progress: bool = False,
                callback=None) -> ClipnModel:
    """Train CLIPN on an image-caption dataset (``dataset.captions``); returns the trained :class:`ClipnModel`.

    Runs on ``train.engine.run_training`` with the ``clipn`` objective: AdamW, ``lr`` constant by default
    (``schedule="cosine"`` with ``warmup_steps`` gives the authors' warm-up + cosine), seeded, resumable from
    ``checkpoint_dir``. ``image_features`` (n, d) may be given (the frozen image tower's output); otherwise
    they are computed with ``features.embed_images``. ``device`` None = CUDA when present, else CPU.
    ``history`` holds the per-step loss of this session. Batches are consecutive slices of a permutation
    seeded by (seed, epoch) (``min(batch_size, n)`` each, no partial batch) with one caption per image drawn
    from a generator seeded by (seed, epoch, batch); the prompt choice comes from the engine's per-step seed.
    """
    from .engine import TrainSettings, get_objective, resolve_device, run_training

    if steps < 1 or batch_size < 2:
        raise ValueError(f"steps must be >= 1 and batch_size >= 2; got {steps}, {batch_size}")
    captions = _captions(pairs_dataset)
    if image_features is None:
        from ..features.embed import embed_images

        embedded = embed_images(backbone, pairs_dataset, progress=False)
        image_features = embedded.features
        captions = [captions[i] for i in embedded.indices]  # undecodable images are left out, with their captions
    feats = F.normalize(torch.as_tensor(np.asarray(image_features), dtype=torch.float32), dim=-1)
    if len(feats) != len(captions):
        raise CliplabError(f"{len(feats)} image features but {len(captions)} caption lists")
    device = resolve_device(device)
    n, batch = len(captions), min(batch_size, len(captions))
    identity = json.dumps({"model_id": backbone.model_id, "n_prompts": n_prompts, "pairs": n, "batch_size": batch,
                           "captions": digest(json.dumps(captions))})
    settings = TrainSettings(steps=steps, lr=lr, optimizer="adamw", weight_decay=weight_decay,
                             warmup_steps=warmup_steps, schedule=schedule, seed=seed, device=str(device),
                             checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, progress=progress,
                             desc="clipn", identity=identity)

    def data(epoch: int, start: int = 0):
        order = np.random.default_rng([seed, epoch]).permutation(n)
        for position in range(start, n // batch):
            idx = order[position * batch:(position + 1) * batch]
            pick = np.random.default_rng([seed, epoch, position])
            texts = [captions[i][pick.integers(len(captions[i]))] for i in idx]
            yield {"image_features": feats[idx], "tokens": backbone.tokenize(texts)}

    history: list[float] = []

    def record(step: int, loss: float) -> None:
        if len(history) < step and loss == loss:  # not NaN: a finished run resumed takes no step
            history.append(loss)
        if callback is not None:
            callback(step, loss)

    original_device = backbone.device
    moved = original_device != device
    if moved:
        backbone.to(device)
    try:
        model = ClipnModel.init(backbone, n_prompts)
        run_training(ClipnTrainable(model), get_objective("clipn"), data, settings, callback=record)
        model.history = history
        for param in model.no_encoder.model.parameters():
            param.requires_grad_(False)
        model.prompts.requires_grad_(False)
    finally:
        if moved:
            backbone.to(original_device)
    if moved:
        model.no_encoder.to(original_device)
        model.prompts = torch.nn.Parameter(model.prompts.detach().to(original_device), requires_grad=False)
    return model


@torch.no_grad()
def evaluate_loss(model: ClipnModel, image_features, captions: Sequence[str]) -> float:
    """The CLIPN loss on aligned (image feature, caption) rows with the mean "no" prompt (inference mode)."""
    feats = F.normalize(torch.as_tensor(np.asarray(image_features), dtype=torch.float32), dim=-1)
    tokens = model.backbone.tokenize(list(captions))
    yes = model.backbone.forward_texts(tokens).float().cpu()
    no = model.forward_no(tokens).float().cpu()
    return float(clipn_loss(feats, yes, no, model.logit_scale))
