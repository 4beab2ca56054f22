"""Cross-modal distillation (paper 8, DCLIP): the objective ``"distill"`` for ``train.engine.run_training``.

``loss = lam * InfoNCE(student images, student texts) + (1 - lam) * cosine term``, where the InfoNCE part is the
``clip`` objective exactly (open_clip's ``ClipLoss`` with the student's learned temperature, features
L2-normalised, the logit scale clamped after each step) and the cosine term is ``mean_i (1 - cos(s_i, t_i))``
between each student embedding and the user's teacher embedding of the same item, averaged over the sides the
batch gives teachers for (``"teacher_images"`` (n, d) and/or ``"teacher_texts"`` (n, d), rows in the batch's image
order; a text teacher row per image, after ``text_index``). The teacher is anything that gives embeddings in the
student's space: DCLIP's cross-attention teacher, or a stronger CLIP's cached embeddings of the same width.

Departures: the authors' code is not public (an anonymous link); the paper's hybrid loss is written here as issue
28 states it, with the cosine term averaged over both modalities when both teachers are given.
"""

from __future__ import annotations

import torch

from ..errors import CliplabError
from .engine import register_objective
from .objectives import ClipObjective, _model

TEACHER_KEYS = {"images": "teacher_images", "texts": "teacher_texts"}


def cosine_term(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``mean_i (1 - cos(student_i, teacher_i))``; 0 when the student equals the teacher (up to scale)."""
    if student.shape != teacher.shape:
        raise CliplabError(f"distill: teacher embeddings {tuple(teacher.shape)} do not match the student's "
                           f"{tuple(student.shape)} (give one teacher row per item, in the student's width)")
    return (1 - torch.nn.functional.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


@register_objective("distill")
class DistillObjective(ClipObjective):
    """``lam * clip + (1 - lam) * (1 - cos(student, teacher))`` (DCLIP's hybrid loss)."""

    def __init__(self, lam: float = 0.5):
        if not 0.0 <= float(lam) <= 1.0:
            raise CliplabError(f"distill: lam {lam} must lie in [0, 1]")
        super().__init__()
        self.lam = float(lam)

    def __call__(self, module, batch: dict) -> tuple[torch.Tensor, dict]:
        images, texts = self.features(module, batch)
        given = {side: batch[key] for side, key in TEACHER_KEYS.items() if batch.get(key) is not None}
        if not given and self.lam < 1:
            raise CliplabError("distill: the batch has no teacher embeddings (teacher_images / teacher_texts)")
        scale = _model(module).logit_scale.exp()
        with torch.autocast(images.device.type, enabled=False):
            contrastive = self.loss(images, texts, scale.float())
            student = {"images": images, "texts": texts}
            terms = [cosine_term(student[side], t.to(images.device)) for side, t in given.items()]
            cosine = torch.stack(terms).mean() if terms else images.new_zeros(())
            loss = self.lam * contrastive + (1 - self.lam) * cosine
        return loss, {"logit_scale": float(scale.detach()), "infonce": float(contrastive.detach()),
                      "cosine": float(cosine.detach())}
