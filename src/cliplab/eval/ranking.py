"""Text-driven image ranking (paper 15): metrics, the zero-shot baseline, and ordering a set of images.

- ``kendall_tau(truth, scores)``: scipy's tau-b (ties in either ranking accounted for);
- ``pairwise_accuracy(truth, scores)``: over the pairs whose targets differ, the share ordered the same way by the
  scores, a tie in the scores counting half (``pair_counts`` gives the counts behind both);
- ``zero_shot_scores``: the untrained baseline, the cosine of each image embedding to the ranking text's;
- ``rank_images``: scores of a dataset's readable images by the zero-shot cosine or a trained adapter
  (``train.rank_adapter``), in order, with the failures and seconds per item.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import CliplabError

PAIR_CHUNK = 2048  # rows of the pair matrix counted at a time


def pair_counts(truth, scores) -> dict[str, int]:
    """Counts over unordered pairs i < j: ``concordant`` / ``discordant`` (targets and scores both differ, same /
    opposite order), ``score_ties`` (targets differ, scores equal), ``truth_ties`` (targets equal, scores
    differ), ``both_ties``."""
    t = np.asarray(truth, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if len(t) != len(s):
        raise CliplabError(f"ranking metrics: {len(t)} targets but {len(s)} scores")
    counts = dict.fromkeys(("concordant", "discordant", "score_ties", "truth_ties", "both_ties"), 0)
    for start in range(0, len(t), PAIR_CHUNK):
        rows = slice(start, start + PAIR_CHUNK)
        dt = np.sign(t[rows, None] - t[None, :])
        ds = np.sign(s[rows, None] - s[None, :])
        upper = np.arange(len(t))[None, :] > np.arange(len(t))[rows, None]
        product = dt * ds
        counts["concordant"] += int(((product > 0) & upper).sum())
        counts["discordant"] += int(((product < 0) & upper).sum())
        counts["score_ties"] += int(((dt != 0) & (ds == 0) & upper).sum())
        counts["truth_ties"] += int(((dt == 0) & (ds != 0) & upper).sum())
        counts["both_ties"] += int(((dt == 0) & (ds == 0) & upper).sum())
    return counts


def pairwise_accuracy(truth, scores) -> float:
    """(concordant + score_ties / 2) / pairs with different targets; NaN when every target is the same."""
    c = pair_counts(truth, scores)
    pairs = c["concordant"] + c["discordant"] + c["score_ties"]
    return float("nan") if pairs == 0 else (c["concordant"] + 0.5 * c["score_ties"]) / pairs


def kendall_tau(truth, scores) -> float:
    """Kendall's tau-b of the scores against the targets (``scipy.stats.kendalltau``)."""
    from scipy.stats import kendalltau

    t = np.asarray(truth, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if len(t) != len(s):
        raise CliplabError(f"ranking metrics: {len(t)} targets but {len(s)} scores")
    if len(t) < 2:
        return float("nan")
    return float(kendalltau(t, s).statistic)


def ranking_metrics(truth, scores, groups=None) -> dict:
    """Kendall tau-b and pairwise accuracy over all items; with ``groups`` (e.g. the source image of each item)
    also their means within groups (``within_tau``, ``within_pairwise``: ordering one picture's versions)."""
    out = {"items": int(len(np.asarray(truth))), "kendall_tau": kendall_tau(truth, scores),
           "pairwise_accuracy": pairwise_accuracy(truth, scores)}
    if groups is not None:
        t, s, g = (np.asarray(a).ravel() for a in (truth, scores, groups))
        taus, accs = [], []
        for group in np.unique(g):
            rows = g == group
            if len(np.unique(t[rows])) > 1:
                taus.append(kendall_tau(t[rows], s[rows]))
                accs.append(pairwise_accuracy(t[rows], s[rows]))
        out["within_tau"] = float(np.nanmean(taus)) if taus else float("nan")
        out["within_pairwise"] = float(np.nanmean(accs)) if accs else float("nan")
        out["groups"] = len(taus)
    return out


def zero_shot_scores(backbone, dataset, text: str, cache_dir=None, *, batch_size: int = 64, workers=None,
                     progress: bool = False):
    """Cosine of each readable image's embedding to ``text``'s (the untrained baseline) and the image features."""
    from ..features import embed_images

    feats = embed_images(backbone, dataset, cache_dir, batch_size=batch_size, num_workers=workers, progress=progress)
    direction = backbone.encode_texts([text]).float().numpy()[0]
    return np.asarray(feats.features, dtype=np.float64) @ direction.astype(np.float64), feats


@dataclass
class Ranking:
    """Scores of a dataset's readable images (dataset order) and the order to show them in."""

    item_ids: list[str]
    indices: list[int]
    scores: np.ndarray
    order: np.ndarray
    method: str
    text: str
    tokens: str = ""
    failures: list = field(default_factory=list)
    seconds: float = 0.0

    def rows(self) -> list[dict]:
        """One row per image in rank order: rank (1 = highest score), score, name."""
        return [{"rank": r + 1, "score": float(self.scores[k]), "name": self.item_ids[k]}
                for r, k in enumerate(self.order)]


def rank_images(backbone, dataset, text: str | None = None, ranker=None, cache_dir=None, *, batch_size: int = 64,
                workers=None, progress: bool = False, descending: bool = True) -> Ranking:
    """Rank ``dataset``'s images by ``text``: with ``ranker`` (a ``FittedRanker``) its regression scores on the
    images' tokens (``text`` None: the text it was trained for), else the zero-shot cosine to ``text``."""
    from ..train.rank_adapter import image_tokens, rank_order, text_tokens

    began = time.perf_counter()
    if ranker is None:
        if not text or not text.strip():
            raise CliplabError("say what to rank by: --by \"TEXT\" (or give a trained adapter with --model-dir)")
        scores, feats = zero_shot_scores(backbone, dataset, text, cache_dir, batch_size=batch_size, workers=workers,
                                         progress=progress)
        indices, failures, method, tokens = [int(i) for i in feats.indices], list(feats.failures), "zero-shot", ""
    else:
        if ranker.model_id != backbone.model_id:
            raise CliplabError(f"the adapter was trained on {ranker.model_id}, not {backbone.model_id}: load the same "
                               "model with --model")
        text = text or ranker.text
        tokens_, indices, failures, tokens = image_tokens(backbone, dataset, cache_dir, batch_size=batch_size,
                                                          workers=workers, progress=progress)
        scores = ranker.scores(tokens_, text_tokens(backbone, text)) if len(indices) else np.zeros(0)
        method = "adapter"
    if not len(indices):
        raise CliplabError(f"{dataset.name}: no readable image to rank ({len(failures)} failed)")
    ids = dataset.item_ids()
    return Ranking([ids[i] for i in indices], indices, np.asarray(scores, dtype=np.float64),
                   rank_order(scores, descending), method, text, tokens, failures, time.perf_counter() - began)


def fit_ranker(backbone, dataset, text: str, *, settings=None, config=None, cache_dir=None, batch_size: int = 64,
               workers=None, progress: bool = False, device: str | None = "cpu", checkpoint_dir=None):
    """A ``FittedRanker`` trained on ``dataset``'s readable images with targets from ``data.ordinal.numeric_levels``
    (an ordinal set's levels, or numeric class names) for the ranking ``text``; batches of whole groups where the
    dataset has ``groups`` (an ordinal set's source images)."""
    from ..data.ordinal import numeric_levels
    from ..train.rank_adapter import RankTrainSettings, fit_rank_adapter, image_tokens, text_tokens

    targets = numeric_levels(dataset)
    text_t = text_tokens(backbone, text)
    tokens, indices, failures, source = image_tokens(backbone, dataset, cache_dir, batch_size=batch_size,
                                                     workers=workers, progress=progress)
    if len(indices) < 2:
        raise CliplabError(f"{dataset.name}: {len(indices)} readable image(s); ranking needs at least two")
    groups = getattr(dataset, "groups", None)
    return fit_rank_adapter(tokens, targets[indices], text_t, text=text, model_id=backbone.model_id, tokens=source,
                            settings=settings or RankTrainSettings(), config=config, progress=progress,
                            device=device, checkpoint_dir=checkpoint_dir,
                            groups=None if groups is None else np.asarray(groups)[indices])


def evaluate_ranking(backbone, dataset, text: str | None = None, ranker=None, cache_dir=None, *,
                     batch_size: int = 64, workers=None, progress: bool = False) -> tuple[dict, Ranking]:
    """``ranking_metrics`` of ``rank_images`` on a dataset with numeric targets (within-source means where the
    dataset has ``groups``, as an ordinal set), with seconds per item."""
    from ..data.ordinal import numeric_levels

    targets = numeric_levels(dataset)
    ranking = rank_images(backbone, dataset, text, ranker, cache_dir, batch_size=batch_size, workers=workers,
                          progress=progress)
    groups = getattr(dataset, "groups", None)
    rows = ranking.indices
    metrics = ranking_metrics(targets[rows], ranking.scores, None if groups is None else np.asarray(groups)[rows])
    metrics.update(method=ranking.method, seconds=round(ranking.seconds, 3),
                   seconds_per_item=ranking.seconds / max(len(rows), 1), failed=len(ranking.failures))
    return metrics, ranking
