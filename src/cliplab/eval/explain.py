"""Why an image got its label: each prompt's (template, CuPL sentence, DCLIP descriptor) share of a class's logit.

A text-weights head (zero-shot, CuPL, DCLIP, ...) scores class c as ``s * x . w_c`` with ``w_c`` a positive
multiple of the mean of the class's prompt embeddings ``e_1..e_m`` (DCLIP: the mean itself; CLIP/CuPL: the mean
renormalised). So the logit splits exactly into one term per prompt,

    logit_c = sum_d  s * f_c * (x . e_d) / m,        f_c = |w_c| / |mean_d e_d|,

and that term is the prompt's contribution: the contributions of a class sum to its logit (a test checks it).
Heads that can be explained have ``sentences() -> list[list[str]]`` (the prompts per class, in class order).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CliplabError
from ..features.text import embed_prompts


@dataclass(frozen=True)
class ClassExplanation:
    """One class for one image: its logit, probability and rank, and every prompt's contribution."""

    label: str
    rank: int
    logit: float
    probability: float
    prompts: list[str] = field(default_factory=list)
    similarities: list[float] = field(default_factory=list)
    contributions: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        order = np.argsort(self.contributions)[::-1]
        return {"label": self.label, "rank": self.rank, "logit": self.logit, "probability": self.probability,
                "prompts": [{"prompt": self.prompts[i], "similarity": self.similarities[i],
                             "contribution": self.contributions[i]} for i in order]}


def _sentences(head) -> list[list[str]]:
    from ..heads.registry import head_entry, method_names

    if "sentences" not in head_entry(head).gives:
        raise CliplabError(f"{type(head).__name__} cannot explain its scores (no per-class prompts); use one of "
                           f"{', '.join(method_names(gives='sentences'))}")
    return head.sentences()


def explain(head, x: np.ndarray, top: int = 3, class_names: Sequence[str] | None = None) -> list[ClassExplanation]:
    """The ``top`` classes of one image feature ``x`` (d,) under a fitted text-weights ``head``, best first."""
    sentences = _sentences(head)
    x = np.asarray(x, dtype=np.float32).reshape(1, -1)
    logits = head.logits(x)[0]
    probs = head.predict_proba(x)[0]
    names = list(class_names if class_names is not None else head.class_names)
    order = np.argsort(-logits, kind="stable")[: max(1, min(top, len(names)))]
    embedded = embed_prompts(head.backbone, [sentences[c] for c in order], head.cache_dir)
    out = []
    for rank, (c, e) in enumerate(zip(order, embedded), start=1):
        similarities = (e @ x[0]).astype(np.float64)
        mean = e.astype(np.float64).mean(axis=0)
        factor = float(np.linalg.norm(head.weights_[:, c]) / np.linalg.norm(mean))
        contributions = head.logit_scale_ * factor * similarities / len(similarities)
        out.append(ClassExplanation(names[c], rank, float(logits[c]), float(probs[c]), list(sentences[c]),
                                    similarities.tolist(), contributions.tolist()))
    return out


def plot_explanation(explanations: Sequence[ClassExplanation], path: str | Path, title: str,
                     max_prompts: int = 12) -> Path:
    """Horizontal bars: per top class, its prompts' contributions to the logit (largest first)."""
    from .plots import plt

    rows = [min(max_prompts, len(e.prompts)) for e in explanations]
    fig, axes = plt.subplots(len(explanations), 1, figsize=(9, 1.2 + 0.32 * sum(rows) + 0.5 * len(rows)),
                             squeeze=False, gridspec_kw={"height_ratios": [max(1, r) for r in rows]})
    for ax, e, n in zip(axes[:, 0], explanations, rows):
        order = np.argsort(e.contributions)[::-1][:n]
        values = [e.contributions[i] for i in order]
        labels = [_short(e.prompts[i]) for i in order]
        ax.barh(range(n), values, color="tab:blue")
        ax.set_yticks(range(n), labels, fontsize=8)
        ax.invert_yaxis()
        more = f", {len(e.prompts) - n} more not shown" if len(e.prompts) > n else ""
        ax.set_title(f"#{e.rank} {e.label}: p={e.probability:.3f}, logit {e.logit:.2f} = sum of "
                     f"{len(e.prompts)} contributions{more}", fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("contribution to the class logit")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _short(text: str, width: int = 70) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."
