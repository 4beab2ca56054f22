"""What ``cliplab methods`` lists of the open-set scores, without importing them (a test keeps it in sync).

Each entry: (paper number in ../shared/papers.md or a citation, where it is, summary).
"""

from __future__ import annotations

OOD_SCORE_CATALOG: dict[str, tuple[str, str, str]] = {
    "msp": ("Hendrycks & Gimpel 2017", "cliplab.ood.msp", "maximum softmax probability of any head's logits"),
    "max-logit": ("Hendrycks et al. 2022", "cliplab.ood.max_logit", "largest logit"),
    "energy": ("Liu et al. 2020", "cliplab.ood.energy", "T * logsumexp(logits / T)"),
    "mcm": ("Ming et al. 2022", "cliplab.ood.mcm", "max softmax of cosine similarities to class prompts / T"),
    "glmcm": ("Miyai et al. 2023", "cliplab.ood.glmcm", "MCM plus local MCM over ViT patch tokens"),
    "cooked": ("1", "heads: cooked", "ensemble of closed-world classifier, zero-shot CLIP and a linear probe"),
    "clipn-ctw": ("18", "cliplab.ood.ctw", "CLIPN competing-to-win with a trained 'no' text encoder"),
    "clipn-atd": ("18", "cliplab.ood.atd", "CLIPN agreeing-to-differ with a trained 'no' text encoder"),
}
