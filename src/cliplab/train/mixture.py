"""Weighted mixtures of pair sources for pretraining (``cliplab pretrain --source A:0.7 --source B:0.3``).

A mixture is recorded in ``PretrainConfig.source`` as ``mixture:`` + JSON ``{"name": weight, ...}`` (the sources
in the order given, weights as given), so it is in the run's config, hash and model card. Each batch comes
whole from one source, drawn with probability weight / sum of weights by a generator seeded by (seed, epoch)
(``mixture_draws``); a source of weight 0 is never drawn (nor opened). Source k's j-th drawn batch is its own
``PairStream`` batch j (epoch j // its batches per epoch), read with seed ``seed + 7919 k``: a resumed run
repeats an uninterrupted one, and a one-source mixture yields exactly that source's batches. ``items`` are
offset by the sizes of the sources before (unique across sources). The one-source form (``--source cifar10``
or ``cifar10:1``) is recorded as the plain source: the same run as before mixtures.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence

import numpy as np

from .config import PretrainOptionError

PREFIX = "mixture:"
SEED_STRIDE = 7919


def parse_weighted(items: Sequence[str]) -> list[tuple[str, float]]:
    """``NAME[:WEIGHT]`` items (weight 1 when left out) -> (name, weight); one-line errors."""
    out: list[tuple[str, float]] = []
    for item in items:
        name, sep, text = item.rpartition(":")
        if not sep:
            name, text = item, "1"
        try:
            weight = float(text)
        except ValueError:
            raise PretrainOptionError(f"--source {item!r}: expected NAME:WEIGHT with a number as WEIGHT") from None
        if not name or not math.isfinite(weight) or weight < 0:
            raise PretrainOptionError(f"--source {item!r}: expected NAME:WEIGHT with a weight >= 0")
        if name in dict(out):
            raise PretrainOptionError(f"--source {name!r} is given twice")
        out.append((name, weight))
    if not out or sum(w for _, w in out) <= 0:
        raise PretrainOptionError("--source: give at least one source with a weight above 0")
    return out


def mixture_source(items: Sequence[str]) -> str:
    """The ``PretrainConfig.source`` for ``--source`` items: the plain name for one source, else the mixture."""
    pairs = parse_weighted(items)
    if len(pairs) == 1:
        return pairs[0][0]
    return PREFIX + json.dumps(dict(pairs))


def is_mixture(source: str) -> bool:
    return source.startswith(PREFIX)


def read_mixture(source: str) -> list[tuple[str, float]]:
    """(name, weight) of a recorded mixture source."""
    try:
        data = json.loads(source[len(PREFIX):])
    except ValueError:
        data = None
    if not isinstance(data, dict) or not data:
        raise PretrainOptionError(f"source {source!r}: a mixture is mixture:{{\"name\": weight, ...}}")
    return parse_weighted([f"{k}:{v}" for k, v in data.items()])


def mixture_draws(weights: Sequence[float], seed: int, epoch: int, count: int) -> np.ndarray:
    """The source index of each of ``count`` batches of ``epoch``: iid draws with p = weights / sum(weights)."""
    p = np.asarray(weights, dtype=np.float64)
    p = p / p.sum()
    return np.random.default_rng([seed, epoch, 0x6D6978]).choice(len(p), size=count, p=p)


class MixtureStream:
    """Batches from several ``PairStream``s, one source per batch, drawn by weight (see the module docstring)."""

    def __init__(self, streams: Sequence, weights: Sequence[float], names: Sequence[str] | None = None):
        if len(streams) != len(weights) or not streams:
            raise PretrainOptionError("a mixture needs one weight per source")
        self.streams, self.weights = list(streams), [float(w) for w in weights]
        self.names = list(names) if names is not None else [f"source {k}" for k in range(len(streams))]
        self.offsets = np.cumsum([0] + [len(s.dataset) for s in self.streams[:-1]]).tolist()

    def __len__(self) -> int:
        return sum(len(s) for s in self.streams)

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return [(f"{n}/{item}", why) for n, s in zip(self.names, self.streams) for item, why in s.skipped]

    @property
    def caption_count(self) -> int:
        return sum(s.caption_count for s in self.streams)

    @property
    def caption_source(self) -> str:
        kinds = {s.caption_source for s in self.streams}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    @property
    def item_ids(self) -> list[str]:
        return [f"{n}/{i}" for n, s in zip(self.names, self.streams) for i in s.item_ids]

    def per_epoch(self, batch_size: int) -> int:
        """Batches per mixture epoch: the sum over drawn sources of their batches per epoch."""
        return sum(s.per_epoch(batch_size) for s, w in zip(self.streams, self.weights) if w > 0)

    def batches(self, epoch: int, start: int = 0, *, seed: int, batch_size: int, **options) -> Iterator[dict]:
        """Batches ``start``.. of mixture ``epoch`` (``options`` as ``PairStream.batches``)."""
        per_epoch = self.per_epoch(batch_size)
        done = np.zeros(len(self.streams), dtype=np.int64)  # batches each source gave before this epoch
        for earlier in range(epoch):
            done += np.bincount(mixture_draws(self.weights, seed, earlier, per_epoch), minlength=len(done))
        draws = mixture_draws(self.weights, seed, epoch, per_epoch)
        done += np.bincount(draws[:start], minlength=len(done))
        for k in draws[start:].tolist():
            stream, j = self.streams[k], int(done[k])
            own_epoch, position = divmod(j, stream.per_epoch(batch_size))
            batch = next(iter(stream.batches(own_epoch, position, seed=seed + SEED_STRIDE * k,
                                             batch_size=batch_size, **options)))
            batch["items"] = batch["items"] + self.offsets[k]
            done[k] += 1
            yield batch


def open_mixture(source: str, split: str | None, image_size: int, templates: str, data_root: str | None,
                 progress: bool = True, **options) -> MixtureStream:
    """The ``MixtureStream`` of a recorded mixture: each source of weight > 0 opened on ``split`` where it has
    that split, else whole."""
    from ..data import dataset_splits
    from .pairs import open_stream

    pairs = [(n, w) for n, w in read_mixture(source) if w > 0]
    streams = []
    for name, _ in pairs:
        try:
            own = split if split in dataset_splits(name, data_root) else None
        except (OSError, ValueError):
            own = None
        streams.append(open_stream(name, own, image_size, templates, data_root, progress, **options))
    return MixtureStream(streams, [w for _, w in pairs], [n for n, _ in pairs])
