"""All exceptions cliplab raises on purpose; the CLI prints them as one line."""

from __future__ import annotations


class CliplabError(Exception):
    """Base class: a problem the user can fix, described in one line."""


class ModelLoadError(CliplabError):
    """A model name, path or weights file could not be turned into a Backbone."""


class WeightsUnavailableError(ModelLoadError):
    """Pretrained weights are not on disk and cannot be downloaded (offline)."""


class DeviceError(CliplabError):
    """The requested device does not exist or is not available on this machine."""


class DenseFeaturesUnavailableError(CliplabError):
    """The backbone has no patch tokens (for example a ResNet image tower)."""


class UnsupportedOperationError(CliplabError):
    """The loaded model cannot do what was asked (e.g. run its text tower from token embeddings)."""


class DatasetError(CliplabError):
    """A dataset, manifest or data file is missing, empty or malformed."""


class ImageDecodeError(CliplabError):
    """One image file could not be decoded; carries the path and the reason.

    ``permanent`` is True when the file's content is at fault (empty, not an image, truncated, too
    large): the failure can be remembered until the file changes. Access problems are not permanent.
    """

    def __init__(self, path: str, reason: str, permanent: bool = True):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
        self.permanent = permanent


class ShardsError(DatasetError):
    """A parquet shards folder (``cliplab embed --engine ray``) is incomplete, malformed or of another model."""


class LabelError(CliplabError):
    """Class names or labels are empty, duplicated or inconsistent."""


class TemplateError(CliplabError):
    """A prompt-template set is unknown or malformed."""


class DimensionMismatchError(CliplabError, ValueError):
    """Two feature matrices that must share a dimension do not."""


class FeatureError(CliplabError, ValueError):
    """A feature matrix is malformed: not 2-D, empty, or holding NaN/infinite values."""


class CacheError(CliplabError):
    """The feature cache is unreadable or inconsistent."""


class LLMError(CliplabError):
    """A language-model backend gave no usable answer (down, slow, malformed JSON, refusal, replay miss)."""


class SearchIndexError(CliplabError):
    """A search index folder is missing, half-written or damaged (the message says to rebuild it)."""


class ModelMismatchError(CliplabError):
    """Query vectors would come from another model than the one that built the index."""


class UnknownItemError(CliplabError, LookupError):
    """An item id that the search index does not hold."""


class TextTooLongError(CliplabError, ValueError):
    """A text has more tokens than the model's context and the long-text policy is 'error'."""


class DescriptionError(CliplabError):
    """A class-description set (CuPL sentences, DCLIP descriptors) is unreadable, malformed or mismatches the labels."""
