"""Public name for the dataset API: ``cliplab.datasets.load_dataset("cifar10")`` and friends."""

from .data import *  # noqa: F403
from .data import __all__  # noqa: F401
