"""LightCLIP (paper 41): the objective ``"lightclip"`` for ``train.engine.run_training``.

``loss = instance + token_weight * token + mlm_weight * mlm``:

- instance-level alignment with softened labels: CLIP's symmetric cross-entropy over the batch's logits
  ``s * img @ txt^T`` (the model's learned temperature, L2-normalised features) with soft targets
  ``(1 - eps) I + eps / (n - 1) (1 - I)``; ``eps`` grows linearly from 0 to ``soften`` over the first
  ``soften_steps`` steps (the negatives' labels are softened progressively). ``eps = 0`` is the ``clip`` loss.
- token-level alignment by relaxed bipartite matching: for each matched pair, the cost ``C = 1 - cos`` between its
  image's patch tokens (projected into the joint space by the visual projection) and its caption's word tokens
  (between the start and end tokens, through ``ln_final`` and the text projection); the entropic optimal transport
  plan ``P`` (Sinkhorn, uniform marginals over patches and words, ``ot_eps``, ``ot_iters`` rounds, no gradient
  through the plan) gives ``token = mean_pairs sum(P * C)``.
- masked language modelling with image fusion: each caption's word tokens (between the start and end tokens) are
  masked with probability ``mask_rate`` (at least one per caption; torch's RNG, seeded per step by the engine):
  their embeddings are replaced by a learned mask embedding; the text tower runs on the masked caption, and a light
  fusion module (``MlmFusion``: one cross-attention block, text tokens as queries, the pair's unmasked image patch
  tokens in the joint space, mapped to the text width, as keys and values, added residually) lets the image in;
  the masked positions are predicted over the vocabulary by the word-embedding table (tied decoder) and
  ``mlm = cross-entropy`` over the masked positions. The fusion module and the mask embedding are the objective's
  parameters (trained with the model, kept in the checkpoint's objective state); at inference nothing changes.

The token term needs an open_clip ``CLIP`` with a ViT image tower (patch tokens); with a ResNet tower or another
text tower it is refused in one line (``token_weight=0`` trains the instance term alone). The step count is the
objective's state (kept in the engine's checkpoint), so a resumed run softens as an uninterrupted one.

Departures (the authors' code is not public): the soft-label schedule (linear ramp to ``soften``), the OT cost/plan
choices (uniform marginals, entropic Sinkhorn, plan held fixed) and the MLM term's details are this module's reading
of the paper: CLIP's tokenizer has no mask token (a learned mask embedding takes its place), the image is fused once
after the text tower (the paper injects it "at different network stages"), the decoder is tied to the word
embeddings, and ``mlm_weight`` defaults to 0 so that ``lightclip`` without it is the objective it was.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import CliplabError
from .engine import default_param_groups, register_objective
from .objectives import ClipObjective, _model, vit_tokens


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


def tokens_and_features(model: torch.nn.Module, images: torch.Tensor | None, text: torch.Tensor | None,
                        check_only: bool = False):
    """(image features, patch tokens (n, p, d), text features, word tokens (m, L, d), word mask (m, L)), all in
    the joint space, from one pass of an open_clip ``CLIP`` with a ViT image tower (``check_only``: only refuse
    another model in one line)."""
    from open_clip.model import text_global_pool
    from open_clip.transformer import VisionTransformer

    visual = model.visual
    if not isinstance(visual, VisionTransformer) or not hasattr(model, "token_embedding"):
        raise CliplabError(f"lightclip: token alignment and MLM need an open_clip CLIP with a ViT image tower (this "
                           f"one: {type(visual).__name__}); use token_weight=0 and mlm_weight=0 for the instance term "
                           "alone")
    if check_only:
        return None
    img, patches = vit_tokens(visual, images)
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


class MlmFusion(torch.nn.Module):
    """Image fusion for the MLM term: ``h + out(attention(LN(h), k(patches), v(patches)))``, then the decoder's LN;
    ``mask`` is the learned embedding of a masked word."""

    def __init__(self, width: int, image_dim: int, heads: int):
        super().__init__()
        self.to_text = torch.nn.Linear(image_dim, width)
        self.norm_query = torch.nn.LayerNorm(width)
        self.attention = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_out = torch.nn.LayerNorm(width)
        self.mask = torch.nn.Parameter(torch.randn(width) * 0.02)

    def forward(self, hidden: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """Text hidden states (m, L, width) fused with image patch tokens (m, p, image_dim); the decoder's input."""
        memory = self.to_text(patches)
        fused, _ = self.attention(self.norm_query(hidden), memory, memory, need_weights=False)
        return self.norm_out(hidden + fused)


def mask_words(word_mask: torch.Tensor, rate: float) -> torch.Tensor:
    """Positions to mask: each word position with probability ``rate`` (torch's RNG), at least one word per caption
    that has any; never the start, end or padding tokens."""
    draw = torch.rand(word_mask.shape, device=word_mask.device)
    chosen = (draw < rate) & word_mask
    forced = torch.where(word_mask, draw, torch.full_like(draw, 2.0)).argmin(dim=1)
    none = ~chosen.any(dim=1) & word_mask.any(dim=1)
    chosen[none, forced[none]] = True
    return chosen


def mlm_loss(model: torch.nn.Module, fusion: MlmFusion, text: torch.Tensor, masked: torch.Tensor,
             patches: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the masked words of ``text`` (m, L), predicted from the text tower run with their embeddings
    replaced by ``fusion.mask`` and fused with the pair's image ``patches`` (m, p, d) (module docstring)."""
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(text).to(cast)
    x = torch.where(masked.unsqueeze(-1), fusion.mask.to(cast), x) + model.positional_embedding.to(cast)
    hidden = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    fused = fusion(hidden.float(), patches.float())
    logits = fused[masked] @ model.token_embedding.weight.float().T
    return F.cross_entropy(logits, text[masked])


def _text_heads(model: torch.nn.Module) -> int:
    block = model.transformer.resblocks[0]
    return int(block.attn.num_heads)


@register_objective("lightclip")
class LightClipObjective(ClipObjective):
    """LightCLIP's instance (softened labels) and token (OT) alignment and MLM with image fusion; module docstring."""

    def __init__(self, soften: float = 0.1, soften_steps: int = 1000, token_weight: float = 0.5, ot_eps: float = 0.1,
                 ot_iters: int = 50, mlm_weight: float = 0.0, mask_rate: float = 0.15):
        if not 0.0 <= soften < 1.0 or soften_steps < 1 or token_weight < 0 or ot_eps <= 0 or ot_iters < 1:
            raise CliplabError("lightclip: need 0 <= soften < 1, soften_steps >= 1, token_weight >= 0, ot_eps > 0 "
                               "and ot_iters >= 1")
        if mlm_weight < 0 or not 0.0 < mask_rate <= 1.0:
            raise CliplabError("lightclip: need mlm_weight >= 0 and 0 < mask_rate <= 1")
        super().__init__()
        self.soften, self.soften_steps, self.token_weight = float(soften), int(soften_steps), float(token_weight)
        self.ot_eps, self.ot_iters = float(ot_eps), int(ot_iters)
        self.mlm_weight, self.mask_rate = float(mlm_weight), float(mask_rate)
        self.fusion: MlmFusion | None = None
        self.calls = 0

    def _ensure_fusion(self, model: torch.nn.Module, image_dim: int) -> MlmFusion:
        if self.fusion is None:
            width = model.token_embedding.weight.shape[1]
            generator_state = torch.random.get_rng_state()  # the fusion's init leaves the training draws alone
            torch.manual_seed(0)
            self.fusion = MlmFusion(width, image_dim, _text_heads(model))
            torch.random.set_rng_state(generator_state)
        return self.fusion.to(model.token_embedding.weight.device)

    def param_groups(self, module: torch.nn.Module, weight_decay: float) -> list[dict]:
        """open_clip's split for the model; with the MLM term, the fusion module's (no decay on 1-d parameters)."""
        groups = default_param_groups(module, weight_decay)
        if not self.mlm_weight:
            return groups
        model = _model(module)
        tokens_and_features(model, None, None, check_only=True)
        fusion = self._ensure_fusion(model, _image_dim(model))
        return groups + default_param_groups(fusion, weight_decay)

    def state_dict(self) -> dict:
        state = {"calls": self.calls}
        if self.fusion is not None:
            state["fusion"] = {k: v.detach().cpu().clone() for k, v in self.fusion.state_dict().items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state["calls"])
        if "fusion" in state:
            if self.fusion is None:
                raise CliplabError("lightclip: the checkpoint holds an MLM fusion module but mlm_weight is 0")
            with torch.no_grad():
                for name, value in self.fusion.state_dict(keep_vars=True).items():
                    value.copy_(state["fusion"][name].to(value.device))

    def eps(self) -> float:
        """The label softening of the current step."""
        return self.soften * min(1.0, self.calls / self.soften_steps)

    def __call__(self, module, batch: dict) -> tuple[torch.Tensor, dict]:
        model = _model(module)
        index = batch.get("text_index")
        token = mlm = None
        if self.token_weight or self.mlm_weight:
            img, patches, txt, words, mask = tokens_and_features(model, batch["images"], batch["tokens"])
            text = batch["tokens"] if index is None else batch["tokens"][index]
            if index is not None:
                txt, words, mask = txt[index], words[index], mask[index]
            img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
        else:
            img, txt = self.features(module, batch)
        if self.mlm_weight:
            fusion = self._ensure_fusion(model, patches.shape[-1])
            mlm = mlm_loss(model, fusion, text, mask_words(mask, self.mask_rate), patches)
        scale = model.logit_scale.exp()
        eps = self.eps()
        with torch.autocast(img.device.type, enabled=False):
            instance = soft_clip_loss(img, txt, scale.float(), eps)
            loss = instance
            if token is None and self.token_weight:
                token = token_alignment(patches.float(), words.float(), mask, self.ot_eps, self.ot_iters)
                loss = instance + self.token_weight * token
            if mlm is not None:
                loss = loss + self.mlm_weight * mlm
        self.calls += 1
        logs = {"logit_scale": float(scale.detach()), "instance": float(instance.detach()), "soften": eps}
        if token is not None:
            logs["token"] = float(token.detach())
        if mlm is not None:
            logs["mlm"] = float(mlm.detach())
        return loss, logs


def _image_dim(model: torch.nn.Module) -> int:
    """The width of the projected patch tokens (the joint space, or the tower's width without a projection)."""
    visual = model.visual
    return int(visual.proj.shape[1]) if visual.proj is not None else int(visual.transformer.width)
