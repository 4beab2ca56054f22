"""WaffleCLIP-style random descriptors: the ensembling control for description heads.

WaffleCLIP (Roth et al. 2023, "Waffling around for performance", code ExplainableML/WaffleCLIP) is not in
../shared/papers.md; its random-descriptor control is what paper 30 ("Does VLM Classification Benefit from LLM
Description Semantics?") measures description heads against, so the head is filed under paper 30.

Checked outside this repo against their ``waffle_tools.py`` (commit 7a1b8ee) on the class names of five DCLIP
files: descriptors per class, words per sequence, character groups and characters per group agree; the mean
similarity aggregation agrees to 3e-8. Departure: class names with "_" count words, character groups and
characters on the name with spaces; their code counts groups and characters on the raw key ("aquarium_fish").
"""

from __future__ import annotations

import gzip
import math
import string
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..data.descriptions import load_descriptions
from ..data.prompts import check_class_names, descriptor_sentence, load_templates
from ..errors import DescriptionError
from ..features.text import embed_prompts
from ..models.backbone import Backbone
from .base import ZEROSHOT_SKIPS, TextWeightsHead
from .registry import register

FALLBACK_CHARACTERS = string.ascii_lowercase + string.digits


@lru_cache(maxsize=1)
def word_list() -> tuple[str, ...]:
    """Real words available offline: the whole-word, lower-case alphabetic entries (at least 3 letters) of
    open_clip's BPE vocabulary (``bpe_simple_vocab_16e6.txt.gz``, shipped with open_clip), sorted.

    Departure: WaffleCLIP draws from its own ``word_list.pkl`` (an English word list) that is not available here.
    """
    from open_clip.tokenizer import default_bpe

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")[1:49152 - 256 - 2 + 1]  # the merges open_clip's tokenizer uses
    words = {"".join(line.split()).removesuffix("</w>") for line in lines if line.endswith("</w>")}
    return tuple(sorted(w for w in words if len(w) >= 3 and w.isascii() and w.isalpha() and w.islower()))


def character_list(descriptions: Mapping[str, Sequence[str]] | None) -> list[str]:
    """Their character pool: every character of the description words except spaces, commas and full stops
    (a-z and 0-9 when there are no descriptions: a departure, their pool always comes from descriptions)."""
    if not descriptions:
        return list(FALLBACK_CHARACTERS)
    chars = sorted({ch for items in descriptions.values() for d in items for ch in d} - set(" ,."))
    return chars or list(FALLBACK_CHARACTERS)


def waffle_descriptors(class_names: Sequence[str], pairs: int, seed: int = 0,
                       characters: Sequence[str] | None = None) -> list[str]:
    """``2 * pairs`` random descriptors shared by every class, as WaffleCLIP's ``waffle`` mode builds them.

    Each pair is one random-word sequence and one random-character sequence. Word sequences have
    ``max(round(mean words per class name), 1)`` words, each cut to ``round(mean word length)`` characters.
    Character sequences have ``g = round(mean spaces per class name) + 1`` groups joined by ", ", of
    ``(n + g - n % g) // g`` characters each, ``n = ceil(mean longest-word length)`` (their rounding, which
    adds a whole group's worth when ``n`` is already a multiple of ``g``). Seeded by ``seed`` (numpy's
    ``default_rng``, so the draws differ from theirs, which use the global ``np.random``).
    """
    names = [name.replace("_", " ") for name in class_names]
    if pairs <= 0 or not names:
        return []
    rng = np.random.default_rng(seed)
    words_per = max(round(float(np.mean([len(n.split(" ")) for n in names]))), 1)
    word_len = round(float(np.mean([np.mean([len(w) for w in n.split(" ")]) for n in names])))
    vocabulary = [w[:max(word_len, 1)] for w in word_list()]
    groups = round(float(np.mean([n.count(" ") for n in names]))) + 1
    n_chars = math.ceil(float(np.mean([max(len(w) for w in n.split(" ")) for n in names])))
    n_chars += groups - n_chars % groups
    chars = list(characters) if characters else list(FALLBACK_CHARACTERS)
    out = []
    for _ in range(pairs):
        out.append(" ".join(vocabulary[i] for i in rng.integers(len(vocabulary), size=words_per)))
        out.append(", ".join("".join(chars[i] for i in rng.integers(len(chars), size=n_chars // groups))
                             for _ in range(groups)))
    return out


@register("waffle", family="zeroshot", paper=30, needs_train=False, needs=("descriptions",),
          default_templates=("A photo of a {c}.",), gives=("class_weights", "sentences"))
class WaffleClassifier(TextWeightsHead):
    """WaffleCLIP: class score = mean over shared random descriptors d of cos(x, "A photo of a {c}, which has {d}.").

    ``waffle_count`` pairs (one random-word and one random-character sequence each, :func:`waffle_descriptors`),
    the same for every class, seeded by ``seed``; each is phrased as DCLIP does
    (``data.prompts.descriptor_sentence``) and the class weight is the plain mean of the sentence embeddings
    (``renormalize=False``, their mean of per-descriptor scores). ``waffle_count=0`` is the template classifier.
    ``descriptions`` (file or mapping, DCLIP format) supply the character pool as in their code; with
    ``add_descriptions=True`` this is their ``waffle_and_gpt`` mode: ``e = int(2/3 * waffle_count)`` random pairs
    plus, per class, ``2e`` of its own descriptions drawn with replacement, then ``3e`` of those ``4e`` sentences
    kept at random per class. Their "waffle + concepts" variant (a high-level concept in the prompt) is a
    template here, e.g. ``templates=["A photo of a dog: a {c}."]``. The default template "A photo of a {c}." is
    their ``label_before_text='A photo of a '`` + class name + ``label_after_text='.'``: the clause goes before the
    template's final full stop (``descriptor_sentence``); ``suffix`` is extra text appended after the sentence.

    Departures: the word pool is open_clip's BPE vocabulary (:func:`word_list`); without descriptions the
    character pool is a-z0-9; draws come from ``np.random.default_rng(seed)`` (one head = one of their ``reps``;
    repeat over seeds for their mean ± std); descriptor phrasing matches whole first words
    (``data.prompts.descriptor_clause``: their ``startswith('a')`` makes every random word starting with "a" read
    "which is ..."); logits are ``logit_scale`` times the mean similarity (theirs are unscaled).
    """

    # The scikit-learn estimator checks this head cannot pass, with the reason (heads/base.py, end).
    _contract_skips = ZEROSHOT_SKIPS

    def __init__(
        self,
        backbone: Backbone,
        class_names: Sequence[str],
        waffle_count: int = 15,
        seed: int = 0,
        descriptions: str | Path | Mapping[str, Sequence[str]] | None = None,
        add_descriptions: bool = False,
        templates: str | Sequence[str] = ("A photo of a {c}.",),
        suffix: str = "",
        subset: bool = False,
        logit_scale: float | None = None,
        cache_dir: str | Path | None = None,
    ):
        self.backbone = backbone
        self.class_names = class_names
        self.waffle_count = waffle_count
        self.seed = seed
        self.descriptions = descriptions
        self.add_descriptions = add_descriptions
        self.templates = templates
        self.suffix = suffix
        self.subset = subset
        self.logit_scale = logit_scale
        self.cache_dir = cache_dir

    def descriptors(self) -> list[list[str]]:
        """Per class (in ``class_names`` order), the descriptors phrased into sentences ([""] when there are none)."""
        names = check_class_names(list(self.class_names), "class names")
        per_class = None if self.descriptions is None else load_descriptions(self.descriptions, names,
                                                                            subset=self.subset)
        if self.add_descriptions and per_class is None:
            raise DescriptionError("waffle: add_descriptions=True needs descriptions")
        chars = character_list(per_class)
        if not self.add_descriptions:
            shared = waffle_descriptors(names, int(self.waffle_count), self.seed, chars)
            return [list(shared) or [""] for _ in names]
        effective = int(2 / 3 * int(self.waffle_count))
        shared = waffle_descriptors(names, effective, self.seed, chars)
        rng = np.random.default_rng([self.seed, 1])
        out = []
        for name in names:
            own = list(per_class[name])
            pool = shared + [own[i] for i in rng.integers(len(own), size=2 * effective)]
            keep = rng.choice(len(pool), size=min(3 * effective, len(pool)), replace=False)
            out.append([pool[i] for i in sorted(keep)] or [""])
        return out

    def sentences(self) -> list[list[str]]:
        """Per class, the sentences that are embedded (templates x descriptors)."""
        names = check_class_names(list(self.class_names), "class names")
        templates = load_templates(self.templates)
        return [[descriptor_sentence(t, name, d, True, self.suffix) for t in templates for d in descs]
                for name, descs in zip(names, self.descriptors())]

    def fit(self, X=None, y=None):
        """Embed every class's sentences; ``weights_`` (d, C) is each class's plain mean sentence embedding."""
        sentences = self.sentences()
        embedded = embed_prompts(self.backbone, sentences, self.cache_dir)
        self.sentences_ = sentences
        return self._fit_weights(embedded, False, X, y)

    def fit_summary(self) -> dict:
        counts = sorted({len(s) for s in self.sentences_})
        return {"sentences_per_class": [counts[0], counts[-1]], "waffle_count": int(self.waffle_count),
                "seed": int(self.seed), "logit_scale": self.logit_scale_}
