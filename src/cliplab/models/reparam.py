"""A reparametrisation hook for every linear and attention projection weight of a derived backbone.

``reparametrize(backbone, make)`` registers ``make(name, weight)`` (an ``nn.Module`` mapping the stored weight
to the weight used) with ``torch.nn.utils.parametrize`` on:

- ``"linear"``: the ``weight`` of every ``nn.Linear`` in the towers (MLPs, attention ``out_proj``, Hugging Face
  q/k/v/out projections, ResNet attention-pool projections, ``nn.Linear`` output projections);
- ``"attention"``: packed or separate input projections of attention modules (``in_proj_weight`` of
  ``nn.MultiheadAttention`` and open_clip's ``Attention``, or ``q_proj_weight``/``k_proj_weight``/``v_proj_weight``);
- ``"projection"``: open_clip's bare output projections (``visual.proj``, ``text_projection`` parameters).

Modules read those attributes on every forward (``nn.MultiheadAttention`` passes ``in_proj_weight`` to
``F.multi_head_attention_forward``), so the parametrised weight is what runs. :class:`SingularValues` is
CLIP-SVD's W = U·diag(s)·Vᵀ with only s trainable. Only a ``derive()``d copy can be reparametrised.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.nn.utils import parametrize

from ..errors import UnsupportedOperationError

TARGETS = ("linear", "attention", "projection")
DEFAULT_TARGETS = ("linear", "attention")
_ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


class IdentityWeight(torch.nn.Module):
    """The weight as stored: reparametrised outputs equal the plain ones."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight


class SingularValues(torch.nn.Module):
    """CLIP-SVD: W = U·diag(s)·Vᵀ, U and Vᵀ fixed buffers from the SVD of the stored weight, s trainable."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
        self.register_buffer("u", u.to(weight.dtype))
        self.register_buffer("vh", vh.to(weight.dtype))
        self.s = torch.nn.Parameter(s.to(weight.dtype))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return (self.u * self.s) @ self.vh


def singular_values(name: str, weight: torch.Tensor) -> SingularValues:
    """``make`` for :func:`reparametrize`: CLIP-SVD's singular-value parametrisation of every weight."""
    return SingularValues(weight)


def identity(name: str, weight: torch.Tensor) -> IdentityWeight:
    """``make`` for :func:`reparametrize`: the identity (outputs unchanged)."""
    return IdentityWeight()


def projection_weights(roots: Iterable[tuple[str, torch.nn.Module]], targets: Iterable[str] = DEFAULT_TARGETS,
                       bare: Iterable[tuple[str, torch.nn.Module, str]] = ()) -> list[tuple[str, torch.nn.Module, str]]:
    """``(qualified name, module, attribute)`` of every weight of kind ``targets`` under ``roots``; ``bare`` are
    the output projections stored as plain parameters (kind ``"projection"``)."""
    targets = set(targets)
    unknown = targets - set(TARGETS)
    if unknown:
        raise ValueError(f"unknown reparametrisation targets {sorted(unknown)}; choose from {', '.join(TARGETS)}")
    found: list[tuple[str, torch.nn.Module, str]] = []
    seen: set[int] = set()
    for prefix, root in roots:
        for name, module in root.named_modules(prefix=prefix):
            if id(module) in seen:
                continue
            seen.add(id(module))
            if "linear" in targets and isinstance(module, torch.nn.Linear):
                found.append((f"{name}.weight", module, "weight"))
            if "attention" in targets:
                for attr in _ATTENTION_WEIGHTS:
                    value = _stored(module, attr)
                    if isinstance(value, torch.Tensor) and value.dim() == 2:
                        found.append((f"{name}.{attr}", module, attr))
    if "projection" in targets:
        found.extend(item for item in bare if isinstance(_stored(item[1], item[2]), torch.Tensor))
    return found


def _stored(module: torch.nn.Module, attr: str):
    """The tensor registered as ``attr`` (parameter or an already parametrised one), else None."""
    if parametrize.is_parametrized(module, attr):
        return getattr(module.parametrizations, attr).original
    return module._parameters.get(attr)


def register(weights: list[tuple[str, torch.nn.Module, str]],
             make: Callable[[str, torch.Tensor], torch.nn.Module]) -> list[str]:
    """Register ``make(name, weight)`` on each weight (stored tensor frozen); the names registered."""
    names = []
    for name, module, attr in weights:
        if parametrize.is_parametrized(module, attr):
            raise UnsupportedOperationError(f"{name} is already reparametrised: merge_reparametrisations first")
        weight = getattr(module, attr)
        parametrize.register_parametrization(module, attr, make(name, weight.detach()))
        getattr(module.parametrizations, attr).original.requires_grad_(False)
        names.append(name)
    return names


def merge(model: torch.nn.Module) -> list[str]:
    """Replace every parametrised weight of ``model`` by its current value (a plain parameter again)."""
    merged = []
    for name, module in list(model.named_modules()):
        if not parametrize.is_parametrized(module):
            continue
        for attr in list(module.parametrizations.keys()):
            parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
            merged.append(f"{name}.{attr}" if name else attr)
    return merged


def reparametrised_names(model: torch.nn.Module) -> list[str]:
    """Qualified names of the parametrised weights of ``model``."""
    return [f"{name}.{attr}" if name else attr for name, module in model.named_modules()
            if parametrize.is_parametrized(module) for attr in module.parametrizations]
