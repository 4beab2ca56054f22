"""CLIP-Refine (paper 33): the post-pre-training objective ``"clip-refine"`` for ``train.engine.run_training``.

A short continued training of a pretrained CLIP (``cliplab pretrain --init-model M --loss clip-refine``) with::

    loss = contrastive * clip + random_align * RaFA + distill * HyCD

- RaFA (random feature alignment): one reference vector ``r_i ~ N(mu, sigma^2 I)`` per pair, shared by its image
  and its text, and ``mse(f_img, r) + mse(f_txt, r)`` (mean squared error over all entries) on the unnormalised
  embeddings: both modalities are pulled toward the same prior.
- HyCD (hybrid contrastive-distillation): the frozen original model's logits ``t = f_img' f_txt'^T`` (unnormalised
  embeddings, both directions) give soft targets ``alpha I + (1 - alpha) softmax(t / T)``, and the student's logits
  are fitted by ``KL(target || softmax(s / T)) * T^2`` (batch mean), averaged over the two directions.
- ``clip``: the ``clip`` objective exactly (open_clip's ``ClipLoss``, normalised features, learned temperature).

Defaults are the authors' CLIP-Refine config (yshinya6/clip-refine ``config/01_post-pre-training/clip-refine.yaml``,
``updater/contrastive.py``): contrastive 0, random_align 1, distill 1, alpha 0.5, T 1, prior N(0, 1). The frozen
original is a copy of the model taken at the first step of a run; it is the objective's state (kept in the
engine's checkpoint, so a resumed run distils from the same original).

``modality_gap(image_features, text_features)`` measures the gap: the distance between the two modalities' mean
(L2-normalised) features (Liang et al.), and the paper's measure, the mean squared difference of the means
(``mse(mean_img, mean_txt)``, what the authors' code logs as ``modality_gap``).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ..errors import CliplabError
from .engine import register_objective
from .objectives import ClipObjective, _model


def _raw_features(module, images: torch.Tensor, tokens: torch.Tensor, index) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(module, "forward_images"):
        img, txt = module.forward_images(images, normalize=False), module.forward_texts(tokens, normalize=False)
    else:
        img, txt = module.encode_image(images, normalize=False), module.encode_text(tokens, normalize=False)
    txt = txt.float()
    return img.float(), (txt[index] if index is not None else txt)


def soft_distill(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                 alpha: float = 0.0) -> torch.Tensor:
    """``KL(alpha I + (1 - alpha) softmax(teacher / T) || softmax(student / T)) * T^2``, batch mean."""
    target = (1 - alpha) * F.softmax(teacher_logits / temperature, dim=1)
    target = target + alpha * torch.eye(*target.shape, device=target.device, dtype=target.dtype)
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    return F.kl_div(log_student, target, reduction="batchmean") * temperature ** 2


def hycd_loss(img: torch.Tensor, txt: torch.Tensor, teacher_img: torch.Tensor, teacher_txt: torch.Tensor,
              temperature: float = 1.0, alpha: float = 0.5) -> torch.Tensor:
    """Hybrid contrastive-distillation over both directions (module docstring)."""
    student, teacher = img @ txt.T, teacher_img @ teacher_txt.T
    return (soft_distill(student, teacher, temperature, alpha) + soft_distill(student.T, teacher.T, temperature,
                                                                            alpha)) / 2


def rafa_loss(img: torch.Tensor, txt: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Random feature alignment: ``mse(img, r) + mse(txt, r)`` with one shared reference row per pair."""
    return F.mse_loss(img, reference) + F.mse_loss(txt, reference)


def modality_gap(image_features: torch.Tensor, text_features: torch.Tensor) -> dict[str, float]:
    """The gap between L2-normalised image and text features: ``mean_distance`` ||mean_img - mean_txt|| and
    ``mse_of_means`` (the paper's measure, the squared distance divided by the width)."""
    img = F.normalize(torch.as_tensor(image_features).float(), dim=-1).mean(0)
    txt = F.normalize(torch.as_tensor(text_features).float(), dim=-1).mean(0)
    return {"mean_distance": float((img - txt).norm()), "mse_of_means": float(F.mse_loss(img, txt))}


@register_objective("clip-refine")
class ClipRefineObjective(ClipObjective):
    """CLIP-Refine: RaFA + HyCD against the frozen original (+ optionally CLIP's loss); module docstring."""

    def __init__(self, contrastive: float = 0.0, random_align: float = 1.0, distill: float = 1.0,
                 alpha: float = 0.5, temperature: float = 1.0, prior_mean: float = 0.0, prior_std: float = 1.0):
        if not 0.0 <= alpha <= 1.0 or temperature <= 0 or prior_std <= 0:
            raise CliplabError("clip-refine: need 0 <= alpha <= 1, temperature > 0 and prior_std > 0")
        super().__init__()
        self.contrastive, self.random_align, self.distill = float(contrastive), float(random_align), float(distill)
        self.alpha, self.temperature = float(alpha), float(temperature)
        self.prior_mean, self.prior_std = float(prior_mean), float(prior_std)
        self.teacher: torch.nn.Module | None = None
        self._saved: dict | None = None  # the original's weights from a checkpoint, applied at the first step

    def state_dict(self) -> dict:
        if self.teacher is None:
            return {}
        return {"teacher": {k: v.detach().cpu().clone() for k, v in self.teacher.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        self._saved = state.get("teacher")

    def _teacher(self, module) -> torch.nn.Module:
        if self.teacher is None:
            teacher = copy.deepcopy(_model(module))
            if self._saved is not None:
                teacher.load_state_dict(self._saved)
            self.teacher = teacher.eval().requires_grad_(False)
        return self.teacher

    def __call__(self, module, batch: dict) -> tuple[torch.Tensor, dict]:
        index = batch.get("text_index")
        img, txt = _raw_features(module, batch["images"], batch["tokens"], index)
        if img.shape[0] != txt.shape[0]:
            raise CliplabError(f"clip-refine: {img.shape[0]} images but {txt.shape[0]} captions in a batch "
                               "(give text_index to map images to caption rows)")
        logs: dict[str, float] = {}
        scale = _model(module).logit_scale.exp()
        with torch.autocast(img.device.type, enabled=False):
            loss = img.new_zeros(())
            if self.contrastive:
                clip = self.loss(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), scale.float())
                loss = loss + self.contrastive * clip
                logs["infonce"] = float(clip.detach())
            if self.random_align:
                reference = self.prior_mean + self.prior_std * torch.randn_like(img)
                rafa = rafa_loss(img, txt, reference)
                loss = loss + self.random_align * rafa
                logs["rafa"] = float(rafa.detach())
            if self.distill:
                teacher = self._teacher(module)
                with torch.no_grad():
                    t_img = teacher.encode_image(batch["images"]).float()
                    t_txt = teacher.encode_text(batch["tokens"]).float()
                    t_txt = t_txt[index] if index is not None else t_txt
                hycd = hycd_loss(img, txt, t_img, t_txt, self.temperature, self.alpha)
                loss = loss + self.distill * hycd
                logs["hycd"] = float(hycd.detach())
        logs["modality_gap"] = modality_gap(img.detach(), txt.detach())["mean_distance"]
        return loss, logs
