"""CLIP-EBC's bins, count prompts and training loss (paper 49; the authors' ``models/clip/model.py``,
``models/clip/utils.py``, ``losses/dace_loss.py``, ``losses/dm_loss.py`` and ``losses/bregman_pytorch.py`` at
Yiming-M/CLIP-EBC b52a594 are the reference; this is cliplab's own code).

Bins are integer count intervals ``(low, high)`` (``high`` may be ``inf``); ``fine_bins(t)`` is the authors'
"fine" granularity, ``{0}, {1}, ..., {t-1}, [t, inf)``. A block's class is the last bin containing its count and 0
when none does (``_bin_count``'s rule). Each bin has an anchor, the count it stands for: ``middle`` (the low end
of an open bin, the mid-point of a closed one, as their configs) or ``average`` (the mean training block count in
the bin, as their ``average`` anchors). The predicted block count is ``sum_k softmax(s cos)_k anchor_k``.

The loss is their ``DACELoss`` with ``count_loss="dmcount"`` (the setting their run script uses): per image the
cross-entropy of every block's bin, summed over blocks and averaged over images, plus ``weight_count`` times
DM-Count's loss, which keeps all three of DM-Count's terms as their ``DMLoss`` does: the count L1 (mean over
images), the optimal-transport term (``weight_ot`` = 0.1: entropic OT between the normalised predicted density on
the block centres and the uniform measure on the annotated points, squared pixel distances, Sinkhorn with
``reg`` = 10 and at most 100 iterations; the loss is ``sum(density * g)`` with ``g`` the detached gradient of the
OT objective, ``beta / c - <density, beta> / c^2``, so its value is 0 and only its gradient acts) and the
total-variation term (``weight_tv`` = 0.01: L1 between the normalised predicted and target densities times the
true count, mean over images). ``count_loss="mae"``/``"mse"`` replace DM-Count by the blockwise L1/L2 as
theirs. Departures: block centres may form a rectangle (theirs a square crop), and the target density is the
point count per block directly (theirs sums a pixel point map into blocks: the same numbers).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import CliplabError

SINKHORN_EPS = 1e-16  # DM-Count's M_EPS
DENSITY_EPS = 1e-8  # DM-Count's EPS
COUNT_LOSSES = ("dmcount", "mae", "mse")
_UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
          "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]

Bin = tuple[float, float]


def number_word(n: int) -> str:
    """``n`` in English words for 0..999 (``twenty-one``, ``one hundred five``); digits beyond."""
    n = int(n)
    if n < 0 or n > 999:
        return str(n)
    if n < 20:
        return _UNITS[n]
    if n < 100:
        tens, unit = divmod(n, 10)
        return _TENS[tens - 2] + (f"-{_UNITS[unit]}" if unit else "")
    hundreds, rest = divmod(n, 100)
    return f"{_UNITS[hundreds]} hundred" + (f" {number_word(rest)}" if rest else "")


def fine_bins(truncation: int) -> list[Bin]:
    """``{0}, {1}, ..., {truncation-1}, [truncation, inf)``: the authors' fine integer bins."""
    if truncation < 1:
        raise CliplabError(f"count bins need a truncation of at least 1; got {truncation}")
    return [(float(k), float(k)) for k in range(truncation)] + [(float(truncation), math.inf)]


def check_bins(bins: list[Bin]) -> list[Bin]:
    """Bins as float pairs, each ``low <= high``, in increasing order; else one line."""
    out = [(float(low), float(high)) for low, high in bins]
    if not out or any(low > high for low, high in out) or any(b[0] <= a[1] for a, b in zip(out, out[1:])):
        raise CliplabError(f"count bins must be non-empty, increasing and disjoint (low <= high); got {bins}")
    return out


def middle_anchors(bins: list[Bin]) -> list[float]:
    """A bin's mid-point, or its low end when it is open (``high`` = inf)."""
    return [low if math.isinf(high) else (low + high) / 2 for low, high in bins]


def average_anchors(bins: list[Bin], block_counts) -> list[float]:
    """The mean of the block counts falling in each bin (a bin without any: its middle anchor)."""
    counts = torch.as_tensor(block_counts, dtype=torch.float64).flatten()
    out = []
    for (low, high), middle in zip(bins, middle_anchors(bins)):
        inside = counts[(counts >= low) & (counts <= high)]
        out.append(float(inside.mean()) if len(inside) else middle)
    return out


def bin_index(counts: torch.Tensor, bins: list[Bin]) -> torch.Tensor:
    """The class of every block count: the last bin holding it, 0 when none does (the authors' rule)."""
    out = torch.zeros_like(counts, dtype=torch.long)
    for k, (low, high) in enumerate(bins):
        out[(counts >= low) & (counts <= high)] = k
    return out


def bin_prompt(low: float, high: float, noun: str = "object", plural: str | None = None,
               prompt_type: str = "word") -> str:
    """The authors' sentence for one bin with ``noun`` for "person"/"people": "There is no object.", "There is
    one object.", "There are two objects.", "There are more than four objects." (an open bin, whose low end it
    names), "There are between two and five objects."."""
    if prompt_type not in ("word", "number"):
        raise CliplabError(f"prompt type must be word or number; got {prompt_type!r}")
    plural = plural or noun + "s"
    say = number_word if prompt_type == "word" else (lambda n: str(int(n)))
    if low == high == 0:
        return f"There is no {noun}." if prompt_type == "word" else f"There is 0 {noun}."
    if low == high == 1:
        return f"There is {say(1)} {noun}."
    if low == high:
        return f"There are {say(low)} {plural}."
    if math.isinf(high):
        return f"There are more than {say(low)} {plural}."
    return f"There are between {say(low)} and {say(high)} {plural}."


def expected_count(logits: torch.Tensor, anchors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities (B, K, h, w), block counts (B, 1, h, w)) from bin logits (B, K, h, w):
    ``p = softmax(logits)``, ``count = sum_k p_k anchor_k``."""
    probs = logits.softmax(dim=1)
    return probs, (probs * anchors.to(probs).view(1, -1, 1, 1)).sum(dim=1, keepdim=True)


# -- DM-Count -----------------------------------------------------------------------------------------------
def sinkhorn(a: torch.Tensor, b: torch.Tensor, cost: torch.Tensor, reg: float, max_iter: int = 100,
             stop: float = 1e-9, check_every: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropic optimal transport between ``a`` (n) and ``b`` (m) for ``cost`` (n, m) by Sinkhorn-Knopp scaling
    from ``u = 1/n, v = 1/m``: ``v = b / K^T u``, ``u = a / K v`` with ``K = exp(-cost/reg)``, the squared error of
    the second marginal checked every ``check_every`` iterations (stop at or below ``stop``), the last finite
    scaling kept if one turns non-finite; each division carries DM-Count's 1e-16 guard (so a kernel entry far below
    it, a cost beyond about 37 ``reg``, acts as 1e-16 there). Returns (plan (n, m), ``beta = reg log v``)."""
    kernel = torch.exp(-cost / reg)
    u = torch.full_like(a, 1.0 / a.shape[0])
    v = torch.full_like(b, 1.0 / b.shape[0])
    for it in range(1, max_iter + 1):
        previous = u, v
        v = b / (u @ kernel + SINKHORN_EPS)
        u = a / (kernel @ v + SINKHORN_EPS)
        if not (torch.isfinite(u).all() and torch.isfinite(v).all()):
            u, v = previous
            break
        if it % check_every == 0 and float(((b - (u @ kernel) * v) ** 2).sum()) <= stop:
            break
    return u[:, None] * kernel * v[None, :], reg * torch.log(v + SINKHORN_EPS)


def block_centres(length: int, block: int) -> torch.Tensor:
    """Pixel centres of ``length`` blocks of ``block`` pixels: ``block * k + block / 2``."""
    return torch.arange(length, dtype=torch.float32) * block + block / 2


def ot_loss(density: torch.Tensor, points: list[torch.Tensor], block: int, reg: float = 10.0,
            max_iter: int = 100) -> torch.Tensor:
    """DM-Count's OT term for densities (B, 1, h, w) and point lists ((n_i, 2) pixel (x, y)): per image with
    points, ``sum(density * g)`` with ``g = beta / c - <density, beta> / c^2`` detached (``c`` the predicted
    count, ``beta`` Sinkhorn's dual of the normalised density against the uniform point measure)."""
    _, _, h, w = density.shape
    ys, xs = block_centres(h, block).to(density.device), block_centres(w, block).to(density.device)
    total = density.new_zeros(())
    for k, pts in enumerate(points):
        if len(pts) == 0:
            continue
        pts = pts.to(density)
        dist = ((pts[:, 1:2] - ys[None, :]) ** 2)[:, :, None] + ((pts[:, 0:1] - xs[None, :]) ** 2)[:, None, :]
        source = density[k, 0].reshape(-1).detach()
        count = source.sum()
        target = torch.full((len(pts),), 1.0 / len(pts), dtype=density.dtype, device=density.device)
        _, beta = sinkhorn(target, source / (count + DENSITY_EPS), dist.reshape(len(pts), -1), reg, max_iter)
        grad = count / (count * count + DENSITY_EPS) * beta - (source * beta).sum() / (count * count + DENSITY_EPS)
        total = total + (density[k, 0].reshape(-1) * grad.detach()).sum()
    return total


def dm_count_loss(density: torch.Tensor, target: torch.Tensor, points: list[torch.Tensor], block: int,
                  weight_ot: float = 0.1, weight_tv: float = 0.01, reg: float = 10.0, max_iter: int = 100
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DM-Count: count L1 + ``weight_ot`` OT + ``weight_tv`` TV (module docstring); densities (B, 1, h, w)."""
    pred_count = density.flatten(1).sum(dim=1)
    true_count = torch.tensor([float(len(p)) for p in points], dtype=density.dtype, device=density.device)
    normed = density / (pred_count.view(-1, 1, 1, 1) + DENSITY_EPS)
    normed_target = target / (true_count.view(-1, 1, 1, 1) + DENSITY_EPS)
    ot = ot_loss(density, points, block, reg, max_iter)
    tv = ((normed - normed_target).abs().flatten(1).sum(dim=1) * true_count).mean()
    count = (pred_count - true_count).abs().mean()
    loss = count + weight_ot * ot + weight_tv * tv
    return loss, {"count_loss": count.detach(), "ot_loss": ot.detach(), "tv_loss": tv.detach()}


def ebc_loss(logits: torch.Tensor, density: torch.Tensor, target: torch.Tensor, points: list[torch.Tensor],
             bins: list[Bin], block: int, count_loss: str = "dmcount", weight_count: float = 1.0,
             **dm_options) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CLIP-EBC's training loss (their DACELoss): blockwise cross-entropy of the target bins (summed over blocks,
    mean over images) + ``weight_count`` x the count loss (``dmcount`` | ``mae`` | ``mse``).

    ``logits`` (B, K, h, w), predicted ``density`` and ``target`` block counts (B, 1, h, w), ``points`` the
    annotated (x, y) pixels per image (DM-Count's OT)."""
    if count_loss not in COUNT_LOSSES:
        raise CliplabError(f"count loss must be one of {', '.join(COUNT_LOSSES)}; got {count_loss!r}")
    if density.shape != target.shape:
        raise CliplabError(f"predicted density {tuple(density.shape)} and target {tuple(target.shape)} differ")
    classes = bin_index(target[:, 0], bins)
    ce = F.cross_entropy(logits, classes, reduction="none").sum(dim=(-1, -2)).mean()
    if count_loss == "dmcount":
        counted, info = dm_count_loss(density, target, points, block, **dm_options)
    else:
        diff = density - target
        counted = (diff.abs() if count_loss == "mae" else diff ** 2).flatten(1).sum(dim=1).mean()
        info = {f"{count_loss}_loss": counted.detach()}
    loss = ce + weight_count * counted
    return loss, {"ce_loss": ce.detach(), **info, "loss": loss.detach()}
