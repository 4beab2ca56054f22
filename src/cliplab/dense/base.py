"""What a dense (segmentation) method is and what it is given.

A method is a class registered with :func:`cliplab.dense.registry.register_dense`; its hyperparameters are the
keyword arguments of ``__init__`` (kept under the same names). The pipeline (``cliplab.dense.inference``,
``cliplab.eval.segmentation``, ``cliplab segment``) builds it, calls ``setup(context)`` once with exactly what it
declared in ``needs`` (:class:`DenseContext`), then ``patch_scores(windows)`` on batches of model-size windows:
(n, C, h, w) class probabilities on the windows' patch grid. Everything else (resizing, windows, averaging,
upsampling, the background threshold) is the pipeline's, the same for every method.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import CliplabError

GuidanceEncoder = Callable[[Any], Any]  # (n, 3, H, W) CLIP-normalised windows -> (n, g, h', w') features


@dataclass
class DenseContext:
    """What a method is given once: the backbone and class names always; ``text_weights`` (torch (d, C),
    L2-normalised columns), ``tower`` (a ``cliplab.models.dense.DenseTower``) and ``guidance`` (a
    :data:`GuidanceEncoder` or None) when declared; ``cache_dir`` the feature cache root (None: the default)."""

    backbone: Any
    class_names: list[str]
    text_weights: Any = None
    tower: Any = None
    guidance: GuidanceEncoder | None = None
    cache_dir: Any = None


class DenseMethod:
    """Base of the registered dense methods: parameters from ``__init__``, ``setup``, ``patch_scores``."""

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def param_names(cls) -> list[str]:
        if cls.__init__ is object.__init__:
            return []
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    def get_params(self) -> dict:
        """The hyperparameters and their values (what a results JSON records)."""
        return {key: getattr(self, key) for key in self.param_names()}

    def setup(self, context: DenseContext) -> None:
        self.context_ = context

    def patch_scores(self, images):
        """(n, C, h, w) class probabilities on the patch grid of a batch of windows (n, 3, H, W)."""
        raise NotImplementedError

    def _needs(self, value, what: str):
        if value is None:
            raise CliplabError(f"segmentation method {self.name!r} got no {what}; declare it in needs")
        return value
