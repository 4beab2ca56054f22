"""LightCLIP (paper 41): the objective ``"lightclip"`` for ``train.engine.run_training``.

``loss = instance + token_weight * token``:

- instance-level alignment with softened labels: CLIP's symmetric cross-entropy over the batch's logits
  ``s * img @ txt^T`` (the model's learned temperature, L2-normalised features) with soft targets
  ``(1 - eps) I + eps / (n - 1) (1 - I)``; ``eps`` grows linearly from 0 to ``soften`` over the first
  ``soften_steps`` steps (the negatives' labels are softened progressively). ``eps = 0`` is the ``clip`` loss.
- token-level alignment by relaxed bipartite matching: for each matched pair, the cost ``C = 1 - cos`` between its
  image's patch tokens (projected into the joint space by the visual projection) and its caption's word tokens
  (between the start and end tokens, through ``ln_final`` and the text projection); the entropic optimal transport
  plan ``P`` (Sinkhorn, uniform marginals over patches and words, ``ot_eps``, ``ot_iters`` rounds, no gradient
  through the plan) gives ``token = mean_pairs sum(P * C)``.

The token term needs an open_clip ``CLIP`` with a ViT image tower (patch tokens); with a ResNet tower or another
text tower it is refused in one line (``token_weight=0`` trains the instance term alone). The step count is the
objective's state (kept in the engine's checkpoint), so a resumed run softens as an uninterrupted one.

Departures (the authors' code is not public): the masked-language-modelling term with image fusion (the paper's
third level) is not implemented; the soft-label schedule (linear ramp to ``soften``) and the OT cost/plan choices
(uniform marginals, entropic Sinkhorn, plan held fixed) are this module's reading of the paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import CliplabError
from .engine import register_objective
from .objectives import ClipObjective, _model


def soft_targets(n: int, eps: float, device=None) -> torch.Tensor:
    """``(1 - eps)`` on the diagonal, ``eps / (n - 1)`` elsewhere (rows sum to 1)."""
    eye = torch.eye(n, device=device)
    return (1 - eps) * eye + (eps / max(n - 1, 1)) * (1 - eye)


def soft_clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Symmetric cross-entropy of ``scale * img @ txt^T`` against ``soft_targets(n, eps)`` (features normalised)."""
    logits = scale * img @ txt.T
    target = soft_targets(len(img), eps, img.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


@torch.no_grad()
def sinkhorn(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float = 0.1, iters: int = 100) -> torch.Tensor:
    """Entropic OT plans for a batch: ``cost`` (B, p, w), marginals ``a`` (B, p) and ``b`` (B, w) (zeros allowed:
    masked words get no mass); ``P = diag(u) exp(-C / eps) diag(v)`` after ``iters`` scaling rounds."""
    kernel = torch.exp(-cost / eps)
    u, v = torch.ones_like(a), torch.ones_like(b)
    tiny = torch.finfo(cost.dtype).tiny
    for _ in range(iters):
        u = a / (kernel @ v.unsqueeze(-1)).squeeze(-1).clamp_min(tiny)
        v = b / (kernel.transpose(1, 2) @ u.unsqueeze(-1)).squeeze(-1).clamp_min(tiny)
    return u.unsqueeze(-1) * kernel * v.unsqueeze(1)


def token_alignment(patches: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor, eps: float = 0.1,
                    iters: int = 100) -> torch.Tensor:
    """``mean_i sum(P_i * C_i)`` with ``C_i = 1 - cos(patches_i, words_i)`` and ``P_i`` its Sinkhorn plan."""
    cost = 1 - F.normalize(patches.float(), dim=-1) @ F.normalize(words.float(), dim=-1).transpose(1, 2)
    a = torch.full(patches.shape[:2], 1.0 / patches.shape[1], device=cost.device)
    mask = word_mask.float()
    b = mask / mask.sum(1, keepdim=True).clamp_min(1)
    plan = sinkhorn(cost.detach(), a, b, eps, iters)
    return (plan * cost).sum((1, 2)).mean()


def tokens_and_features(model: torch.nn.Module, images: torch.Tensor, text: torch.Tensor):
    """(image features, patch tokens (n, p, d), text features, word tokens (m, L, d), word mask (m, L)), all in
    the joint space, from one pass of an open_clip ``CLIP`` with a ViT image tower."""
    from open_clip.model import text_global_pool
    from open_clip.transformer import VisionTransformer

    visual = model.visual
    if not isinstance(visual, VisionTransformer) or not hasattr(model, "token_embedding"):
        raise CliplabError(f"lightclip: token alignment needs an open_clip CLIP with a ViT image tower (this one: "
                           f"{type(visual).__name__}); use token_weight=0 for the instance term alone")
    old = visual.output_tokens
    visual.output_tokens = True
    try:
        img, patches = visual(images)
    finally:
        visual.output_tokens = old
    if visual.proj is not None:
        patches = patches @ visual.proj
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(text).to(cast) + model.positional_embedding.to(cast)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    pooled = text_global_pool(x, text, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    projection = model.text_projection
    project = projection if isinstance(projection, torch.nn.Linear) else (lambda t: t @ projection)
    txt, words = (project(pooled), project(x)) if projection is not None else (pooled, x)
    end = text.argmax(dim=-1, keepdim=True)  # the end-of-text token has the largest id
    position = torch.arange(text.shape[1], device=text.device).unsqueeze(0)
    mask = (position > 0) & (position < end)
    return img, patches, txt, words, mask


@register_objective("lightclip")
class LightClipObjective(ClipObjective):
    """LightCLIP's instance (softened labels) and token (OT) alignment; module docstring."""

    def __init__(self, soften: float = 0.1, soften_steps: int = 1000, token_weight: float = 0.5, ot_eps: float = 0.1,
                 ot_iters: int = 50):
        if not 0.0 <= soften < 1.0 or soften_steps < 1 or token_weight < 0 or ot_eps <= 0 or ot_iters < 1:
            raise CliplabError("lightclip: need 0 <= soften < 1, soften_steps >= 1, token_weight >= 0, ot_eps > 0 "
                               "and ot_iters >= 1")
        super().__init__()
        self.soften, self.soften_steps, self.token_weight = float(soften), int(soften_steps), float(token_weight)
        self.ot_eps, self.ot_iters = float(ot_eps), int(ot_iters)
        self.calls = 0

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state["calls"])

    def eps(self) -> float:
        """The label softening of the current step."""
        return self.soften * min(1.0, self.calls / self.soften_steps)

    def __call__(self, module, batch: dict) -> tuple[torch.Tensor, dict]:
        model = _model(module)
        index = batch.get("text_index")
        token = None
        if self.token_weight:
            img, patches, txt, words, mask = tokens_and_features(model, batch["images"], batch["tokens"])
            if index is not None:
                txt, words, mask = txt[index], words[index], mask[index]
            img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
        else:
            img, txt = self.features(module, batch)
        scale = model.logit_scale.exp()
        eps = self.eps()
        with torch.autocast(img.device.type, enabled=False):
            instance = soft_clip_loss(img, txt, scale.float(), eps)
            loss = instance
            if token is None and self.token_weight:
                token = token_alignment(patches.float(), words.float(), mask, self.ot_eps, self.ot_iters)
                loss = instance + self.token_weight * token
        self.calls += 1
        logs = {"logit_scale": float(scale.detach()), "instance": float(instance.detach()), "soften": eps}
        if token is not None:
            logs["token"] = float(token.detach())
        return loss, logs
