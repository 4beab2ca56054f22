"""What an OOD score plugin is and what it is given (no scipy, scikit-learn or torch here).

A score is a class registered with :func:`cliplab.ood.registry.register_score`. Its hyperparameters are the
keyword arguments of ``__init__`` (stored under the same names, as scikit-learn estimators do); it declares
what it reads with ``needs`` (a subset of :data:`NEEDS`). An evaluation (``cliplab.eval.ood``) then

1. builds it with its parameters and calls ``setup(context)`` before any image is embedded (load an artefact,
   check it belongs to this model);
2. calls ``fit(train, val)`` once when it needs ``fit_data`` (ID train and val features, never the test set);
3. calls ``score(inputs)`` for each dataset: (n,) scores, higher = more in-distribution.

``inputs`` (:class:`ScoreInputs`) carries the image features and, only when some chosen score declared them,
the head's logits and the patch grids; ``context.text_weights`` is filled when a score declared
``text_weights``. A score never fetches those itself, so one embedding serves every score.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..errors import CliplabError
from .registry import NEEDS

__all__ = ["NEEDS", "OODScore", "ScoreContext", "ScoreInputs"]



@dataclass
class ScoreContext:
    """What an evaluation gives every score once (``text_weights``, ``fit_data``, ``artefact``: when declared)."""

    backbone: Any
    class_names: list[str]
    templates: Any = None
    text_weights: np.ndarray | None = None  # (d, C)
    artefact: Any = None  # a folder path or an already loaded object
    cache_dir: Path | None = None
    memo: dict = field(default_factory=dict)  # shared by the scores of one evaluation (e.g. CLIPN's p_yes/p_no)
    head: Any = None  # the evaluation's head (fitted before ``score``), for scores that declare "head"


@dataclass
class ScoreInputs:
    """One dataset's inputs: ``features`` always; ``logits``/``local_features`` when a chosen score declared them."""

    name: str
    features: np.ndarray  # (n, d)
    logits: np.ndarray | None = None  # (n, C)
    local_features: np.ndarray | None = None  # (n, P, d)


class OODScore:
    """Base of the registered scores: parameters from ``__init__``, ``setup``/``fit`` hooks, ``score``."""

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    artefact_help: ClassVar[str] = ""  # scores that declare "artefact": what the folder is (shown when it is missing)
    #: A score with its own decision (reject below ``threshold``) also gets open-set accuracies and the H-score.
    threshold: ClassVar[float | None] = None

    @classmethod
    def param_names(cls) -> list[str]:
        """The hyperparameters: keyword arguments of ``__init__``."""
        if cls.__init__ is object.__init__:
            return []
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    def get_params(self) -> dict:
        """The hyperparameters and their values (what a results JSON records)."""
        return {key: getattr(self, key) for key in self.param_names()}

    def dense_spec(self) -> dict:
        """Scores that declare ``patch_grids``: the ``cliplab.features.dense.DenseSpec`` fields of the patch tokens
        they read (default: the final layer's tokens at the model's input)."""
        return {}

    def setup(self, context: ScoreContext) -> None:
        """Before any image is embedded: keep the context; load and check an artefact here."""
        self.context_ = context

    def fit(self, train, val) -> None:
        """Scores that declare ``fit_data``: fit once on the ID train and val ``ImageFeatures``."""

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        """(n,) scores for one dataset, higher = more in-distribution."""
        raise NotImplementedError

    def _needs(self, value, what: str):
        """``value`` or a one-line error naming the declaration that should have supplied it."""
        if value is None:
            raise CliplabError(f"OOD score {self.name!r} got no {what}; declare it in needs")
        return value
