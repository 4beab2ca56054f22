"""cliplab: load any CLIP model, embed and cache features, classify, evaluate."""

__version__ = "0.1.0"

from . import datasets  # noqa: E402
from .features import FeatureCache, ImageFeatures, embed_images, embed_texts  # noqa: E402
from .heads import ZeroShotClassifier  # noqa: E402
from .models import Backbone, load_model  # noqa: E402

__all__ = [
    "Backbone", "FeatureCache", "ImageFeatures", "ZeroShotClassifier", "__version__", "datasets",
    "embed_images", "embed_texts", "load_model",
]
