"""CLIP-Caption-Reward's grammar head (paper 47): a small MLP on text features, trained on corrupted captions.

Following j-min/CLIP-Caption-Reward (``retrieval/text_utils.py``, ``retrieval/caption_data.py: get_negative_text``,
``captioning/utils/clipscore.py``): each positive caption gets one negative made by one of five corruptions drawn
uniformly, on whitespace tokens:

- ``repeat``: an n-gram (n in 1..3) inserted again 1..3 times at random positions;
- ``remove``: an n-gram (n in 1..3) deleted;
- ``insert``: 1..3 vocabulary words inserted at random positions (before the last token at the latest, as theirs);
- ``swap``: 1..3 positions replaced by a different vocabulary word;
- ``shuffle``: the tokens permuted.

The head is ``Linear(d, h, bias=False) -> ReLU -> Linear(h, 2, bias=False)`` trained with cross-entropy on
positives (label 1) and negatives (label 0); ``probability`` is ``softmax(logits)[:, 1]``, what their reward uses.
It trains through the one training loop (``train.engine.run_training``, objective ``"caption-grammar"``).

Departures: their head reads the text tower's pooled output before the projection and is trained jointly with the
CLIP loss while the text encoder is fine-tuned; here the encoder stays frozen and the head reads the model's
(normalised, projected) text features of the prompted caption, so an epoch never re-encodes text; h defaults to
d (theirs: projection_dim = 512 = d for ViT-B/32). Their optimiser is AdamW (lr 1e-4, weight decay 0.01,
eps 1e-6, batch 1600, 30 epochs on COCO); on small corpora we default to lr 1e-3 and batches of 128. Corruptions
draw from a seeded ``random.Random``; n-gram sizes are capped at the caption's length (theirs raise on captions
shorter than the drawn n) and ``swap`` needs a vocabulary word other than the token (theirs loops forever).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import CliplabError
from ..train.engine import TrainSettings, register_objective, run_training

CORRUPTIONS = ("repeat", "remove", "insert", "swap", "shuffle")


def repeat(tokens: list[str], rng: random.Random, max_gram: int = 3, max_repeat: int = 3) -> list[str]:
    n = rng.randint(1, min(max_gram, len(tokens)))
    at = rng.randint(0, len(tokens) - n)
    gram = tokens[at:at + n]
    out = list(tokens)
    for _ in range(rng.randint(1, max_repeat)):
        where = rng.randint(0, len(out))
        out = out[:where] + gram + out[where:]
    return out


def remove(tokens: list[str], rng: random.Random, max_gram: int = 3) -> list[str]:
    n = rng.randint(1, min(max_gram, len(tokens)))
    at = rng.randint(0, len(tokens) - n)
    return tokens[:at] + tokens[at + n:]


def insert(tokens: list[str], rng: random.Random, vocab: Sequence[str], max_tokens: int = 3) -> list[str]:
    out = list(tokens)
    for _ in range(rng.randint(1, max_tokens)):
        where = rng.randint(0, max(len(out) - 1, 0))
        out = out[:where] + [rng.choice(vocab)] + out[where:]
    return out


def swap(tokens: list[str], rng: random.Random, vocab: Sequence[str], max_tokens: int = 3) -> list[str]:
    out = list(tokens)
    for _ in range(rng.randint(1, max_tokens)):
        where = rng.randint(0, len(out) - 1)
        others = [v for v in vocab if v != out[where]]
        if not others:
            raise CliplabError("swap: the vocabulary has no word other than the one to replace")
        word = rng.choice(vocab)
        while word == out[where]:
            word = rng.choice(vocab)
        out[where] = word
    return out


def shuffle(tokens: list[str], rng: random.Random) -> list[str]:
    out = list(tokens)
    rng.shuffle(out)
    return out


def corrupt(text: str, vocab: Sequence[str], rng: random.Random, kind: str | None = None) -> tuple[str, str]:
    """A corrupted copy of ``text`` and the corruption used (drawn uniformly from ``CORRUPTIONS`` unless given)."""
    tokens = text.split()
    if not tokens:
        raise CliplabError("corrupt: an empty caption")
    kind = kind or rng.choice(CORRUPTIONS)
    if kind == "repeat":
        out = repeat(tokens, rng)
    elif kind == "remove":
        out = remove(tokens, rng)
    elif kind == "insert":
        out = insert(tokens, rng, vocab)
    elif kind == "swap":
        out = swap(tokens, rng, vocab)
    elif kind == "shuffle":
        out = shuffle(tokens, rng)
    else:
        raise CliplabError(f"corruption {kind!r}: choose one of {', '.join(CORRUPTIONS)}")
    return " ".join(out), kind


def vocabulary(captions: Sequence[str]) -> list[str]:
    """The distinct whitespace tokens of ``captions``, sorted (the words insert and swap draw from)."""
    return sorted({t for c in captions for t in str(c).split()})


def negatives(captions: Sequence[str], seed: int = 0,
              vocab: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """One corrupted caption per caption (seeded) and the corruption each used."""
    rng = random.Random(seed)
    vocab = list(vocab) if vocab is not None else vocabulary(captions)
    pairs = [corrupt(c, vocab, rng) for c in captions]
    return [p[0] for p in pairs], [p[1] for p in pairs]


class GrammarHead(torch.nn.Module):
    """``Linear(d, h, bias=False) -> ReLU -> Linear(h, 2, bias=False)``; class 1 = a well-formed caption."""

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim, hidden or dim, bias=False), torch.nn.ReLU(),
                                       torch.nn.Linear(hidden or dim, 2, bias=False))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)

    @torch.no_grad()
    def probability(self, features) -> np.ndarray:
        """P(well-formed) per row: ``softmax(logits)[:, 1]``."""
        weight = self.net[0].weight
        x = torch.as_tensor(np.asarray(features, dtype=np.float32), device=weight.device)
        return torch.softmax(self(x).float(), dim=-1)[:, 1].cpu().numpy().astype(np.float64)


@register_objective("caption-grammar")
class GrammarObjective:
    """Cross-entropy of the grammar head on ``{"features": (n, d), "labels": (n,)}`` (1 = real, 0 = corrupted)."""

    def __call__(self, module, batch: dict) -> tuple[torch.Tensor, dict]:
        logits = module(batch["features"].float())
        loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"].long())
        accuracy = (logits.argmax(dim=1) == batch["labels"]).float().mean()
        return loss, {"acc": float(accuracy)}


@dataclass
class GrammarFit:
    """A trained head and how it did: accuracy on its training pairs and on held-out captions' pairs."""

    head: GrammarHead
    train_accuracy: float
    held_out_accuracy: float | None
    kinds: dict[str, float]  # held-out accuracy on negatives, per corruption


def accuracy(head: GrammarHead, positives: np.ndarray, negative_features: np.ndarray) -> float:
    """Fraction of positives scored > 0.5 and negatives < 0.5 (``argmax``), over both."""
    p = head.probability(positives) > 0.5
    n = head.probability(negative_features) <= 0.5
    return float(np.concatenate([p, n]).mean())


def fit_grammar_head(positive_features: np.ndarray, negative_features: np.ndarray, *, hidden: int | None = None,
                     epochs: int = 30, lr: float = 1e-3, weight_decay: float = 0.01, batch_size: int = 128,
                     seed: int = 0, progress: bool = False, device: str | None = "cpu") -> GrammarHead:
    """Train a ``GrammarHead`` on positive (label 1) and negative (label 0) text features through the one loop."""
    pos = np.asarray(positive_features, dtype=np.float32)
    neg = np.asarray(negative_features, dtype=np.float32)
    if pos.ndim != 2 or neg.ndim != 2 or pos.shape[1] != neg.shape[1] or not len(pos) or not len(neg):
        raise CliplabError("grammar head: give (n, d) positive and (m, d) negative features of one width")
    features = torch.from_numpy(np.concatenate([pos, neg]))
    labels = torch.cat([torch.ones(len(pos), dtype=torch.long), torch.zeros(len(neg), dtype=torch.long)])
    torch.manual_seed(seed)
    head = GrammarHead(pos.shape[1], hidden)

    def data(epoch: int):
        order = torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(len(features)))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            yield {"features": features[idx], "labels": labels[idx]}

    settings = TrainSettings(epochs=epochs, lr=lr, optimizer="adamw", eps=1e-6, weight_decay=weight_decay,
                             seed=seed, progress=progress, device=device, desc="caption-grammar")
    run_training(head, GrammarObjective(), data, settings)
    return head.cpu().eval()


def train_grammar(backbone, captions: Sequence[str], cache_dir=None, *, held_out: float = 0.2, seed: int = 0,
                  prompt: str | None = None, **fit_options) -> GrammarFit:
    """Corrupt ``captions`` (seeded), embed both sides with the CLIP-S prompt, hold out a seeded fraction of the
    captions (their pairs never reach the fit), train the head and measure it on both parts."""
    from ..features.text import embed_texts
    from .captions import PROMPT, prompted

    texts = [str(c) for c in captions if str(c).strip()]
    if len(texts) < 4:
        raise CliplabError(f"grammar head: {len(texts)} usable captions; give at least 4")
    corrupted, kinds = negatives(texts, seed)
    prefix = PROMPT if prompt is None else prompt
    pos = embed_texts(backbone, prompted(texts, prefix), cache_dir)
    neg = embed_texts(backbone, prompted(corrupted, prefix), cache_dir)
    order = np.random.default_rng(seed).permutation(len(texts))
    n_out = int(round(held_out * len(texts)))
    test, train = order[:n_out], order[n_out:]
    head = fit_grammar_head(pos[train], neg[train], seed=seed, **fit_options)
    per_kind = {}
    if n_out:
        for kind in CORRUPTIONS:
            rows = [i for i in test if kinds[i] == kind]
            if rows:
                per_kind[kind] = float((head.probability(neg[rows]) <= 0.5).mean())
    return GrammarFit(head, accuracy(head, pos[train], neg[train]),
                      accuracy(head, pos[test], neg[test]) if n_out else None, per_kind)
