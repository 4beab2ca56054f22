"""Planar normalising flows over prompt embeddings (Bayes-PFL's prompt flow module, paper 51).

Read against the authors' ``models/flows.py`` (``Planar``) and ``models/PFL.py`` (``PlanarPFL``, image-specific;
``PlanarPFL_state``, image-agnostic), github.com/xiaozhen228/Bayes-PFL:

- one step ``f(z) = z + u tanh(w.z + b)`` with ``log|det df/dz| = log|1 + (1 - tanh^2(w.z + b)) w.u|`` (Rezende and
  Mohamed's planar flow; the authors add ``eps = 1e-5`` inside the log, kept as the default; ``u`` is used as
  given, without the invertibility reparametrisation, as their code);
- the base distribution q(z_0) = N(mu, var) with ``mu`` and ``log var`` from two 3-layer softplus MLPs (their
  ``Encoder``/``InferenceBlock``); their encoder returns ``exp(0.5 * h)`` as the "variance" and samples with its
  square root as the standard deviation, which is kept (``var = exp(h / 2)``, ``std = var ** 0.5``);
- :class:`ImageSpecificFlow`: mu, var and the K flows' (u, w, b) all amortised from the image feature (linear
  maps), so the distribution is the image's own; :class:`ImageAgnosticFlow`: a learned state vector feeds the
  encoder and the K flows have free parameters, one distribution for every image;
- :func:`flow_kl`: their ``binary_loss_function`` without reconstruction, ``(sum_b [log q(z_0) - log p(z_K)] -
  sum_b log|det J|) / batch`` with p = N(0, I) and the Gaussian log densities without the ``-d/2 log 2 pi``
  constant (as their ``log_normal_dist``). Departure: for the image-agnostic flows (one draw per batch) their
  ``binary_loss_function`` broadcasts the one draw's log densities against the image batch, so its term is
  ``log q(z_0) - log p(z_K) - log|det J| / batch``; here the draw's own KL, ``log q - log p - log|det J|``
  (``/work/compare/bayes_pfl`` reproduces theirs from these parts).

Departure: the flow lives in ``z_dim`` (the text width, where the sample is added to prompt tokens) and the
encoder reads ``in_dim`` (the image embedding); the authors have ``z_dim = in_dim = embed_dim`` (equal for their
ViT-L/14-336, whose text width is the embedding width).
"""

from __future__ import annotations

import torch
from torch import nn

LOG_EPS = 1e-5  # the authors' ``torch.log(torch.abs(1 + psi.u) + 1e-5)``


def planar_step(z: torch.Tensor, u: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float = LOG_EPS
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One planar flow step for ``z`` (B, D) with ``u``, ``w`` (B, D) or (D,) and ``b`` (B,) or (): returns
    ``z + u tanh(w.z + b)`` (B, D) and ``log|1 + (1 - tanh^2(w.z + b)) w.u| `` (B,) (``eps`` added inside)."""
    u, w = u.expand_as(z), w.expand_as(z)
    pre = (w * z).sum(-1) + b
    h = torch.tanh(pre)
    out = z + u * h[:, None]
    psi_u = (1 - h ** 2) * (w * u).sum(-1)
    return out, torch.log(torch.abs(1 + psi_u) + eps)


def run_flows(z0: torch.Tensor, u: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float = LOG_EPS
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """K steps: ``u``, ``w`` (B, K, D) or (K, D), ``b`` (B, K) or (K,); returns z_K (B, D) and the summed
    log-determinant (B,)."""
    z, total = z0, torch.zeros(z0.shape[0], dtype=z0.dtype, device=z0.device)
    for k in range(u.shape[-2]):
        z, log_det = planar_step(z, u[..., k, :], w[..., k, :], b[..., k], eps)
        total = total + log_det
    return z, total


def log_normal(x: torch.Tensor, mean: torch.Tensor | float, logvar: torch.Tensor | float) -> torch.Tensor:
    """``sum_d -0.5 (logvar + (x - mean)^2 / exp(logvar))`` (no 2 pi constant), over the last axis."""
    logvar = torch.as_tensor(logvar, dtype=x.dtype, device=x.device)
    return (-0.5 * (logvar + (x - mean) ** 2 / logvar.exp())).sum(-1)


def flow_kl(z0: torch.Tensor, zk: torch.Tensor, mu: torch.Tensor, var: torch.Tensor, log_det: torch.Tensor,
            batch: int | None = None) -> torch.Tensor:
    """The flow's KL term, ``(sum [log q(z_0) - log N(z_K; 0, I)] - sum log|det J|) / batch``; ``batch`` defaults
    to the rows of ``z0``."""
    log_q = log_normal(z0, mu, var.log()) + 1e-8
    log_p = log_normal(zk, 0.0, 0.0) + 1e-8
    return ((log_q - log_p).sum() - log_det.sum()) / (batch or z0.shape[0])


class GaussianEncoder(nn.Module):
    """mu and var of q(z_0) from a feature: two ``Linear-Softplus-Linear-Softplus-Linear`` MLPs; var = exp(h/2)."""

    def __init__(self, in_dim: int, hidden: int, z_dim: int):
        super().__init__()

        def mlp() -> nn.Sequential:
            return nn.Sequential(nn.Linear(in_dim, hidden), nn.Softplus(), nn.Linear(hidden, hidden), nn.Softplus(),
                                 nn.Linear(hidden, z_dim))

        self.mean, self.log_variance = mlp(), mlp()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean(x), torch.exp(0.5 * self.log_variance(x))


def _sample(mu: torch.Tensor, var: torch.Tensor, samples: int) -> torch.Tensor:
    """(samples, B, D) draws of N(mu, var) by the reparametrisation trick."""
    std = var.sqrt()
    return mu + std * torch.randn((samples, *std.shape), dtype=std.dtype, device=std.device)


class FlowDraw:
    """What one pass gives: ``zk`` (S, B, D) samples after the flows, ``z0`` (S, B, D), ``mu``/``var`` (B, D),
    ``log_det`` (S, B)."""

    def __init__(self, zk, z0, mu, var, log_det):
        self.zk, self.z0, self.mu, self.var, self.log_det = zk, z0, mu, var, log_det

    def kl(self, batch: int | None = None) -> torch.Tensor:
        """:func:`flow_kl` averaged over the samples."""
        return torch.stack([flow_kl(self.z0[s], self.zk[s], self.mu, self.var, self.log_det[s], batch)
                            for s in range(self.zk.shape[0])]).mean()


class ImageSpecificFlow(nn.Module):
    """q(z | image): the encoder and the K flows' u, w, b amortised from the image feature (``PlanarPFL``)."""

    def __init__(self, in_dim: int, z_dim: int, hidden: int, n_flows: int, encoder: GaussianEncoder | None = None):
        super().__init__()
        self.z_dim, self.n_flows = z_dim, n_flows
        self.encoder = encoder or GaussianEncoder(in_dim, hidden, z_dim)
        self.amor_u = nn.Linear(in_dim, n_flows * z_dim)
        self.amor_w = nn.Linear(in_dim, n_flows * z_dim)
        self.amor_b = nn.Linear(in_dim, n_flows)

    def forward(self, x: torch.Tensor, samples: int = 1) -> FlowDraw:
        mu, var = self.encoder(x)
        batch = x.shape[0]
        u = self.amor_u(x).view(batch, self.n_flows, self.z_dim)
        w = self.amor_w(x).view(batch, self.n_flows, self.z_dim)
        b = self.amor_b(x).view(batch, self.n_flows)
        z0 = _sample(mu, var, samples)
        out = [run_flows(z0[s], u, w, b) for s in range(samples)]
        return FlowDraw(torch.stack([o[0] for o in out]), z0, mu, var, torch.stack([o[1] for o in out]))


class ImageAgnosticFlow(nn.Module):
    """q(z): a learned state vector through the (possibly shared) encoder, K flows with free u, w, b
    (``PlanarPFL_state``; parameters drawn N(0, 1) as their ``torch.randn``)."""

    def __init__(self, in_dim: int, z_dim: int, hidden: int, n_flows: int, encoder: GaussianEncoder | None = None):
        super().__init__()
        self.encoder = encoder or GaussianEncoder(in_dim, hidden, z_dim)
        self.u = nn.Parameter(torch.randn(n_flows, z_dim))
        self.w = nn.Parameter(torch.randn(n_flows, z_dim))
        self.b = nn.Parameter(torch.randn(n_flows))
        self.state = nn.Parameter(torch.randn(1, in_dim))

    def forward(self, samples: int = 1) -> FlowDraw:
        mu, var = self.encoder(self.state)
        z0 = _sample(mu, var, samples)
        out = [run_flows(z0[s], self.u, self.w, self.b) for s in range(samples)]
        return FlowDraw(torch.stack([o[0] for o in out]), z0, mu, var, torch.stack([o[1] for o in out]))
