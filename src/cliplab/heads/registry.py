"""Head registry: methods register by name, the way timm and open_clip register models."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import CliplabError


@dataclass(frozen=True)
class HeadEntry:
    """A registered head class with its family and the paper it implements."""

    name: str
    cls: type
    family: str
    paper: int | None
    summary: str


_REGISTRY: dict[str, HeadEntry] = {}


def register(name: str, family: str, paper: int | None = None):
    """Class decorator: ``@register("zeroshot", family="zeroshot")``."""

    def decorate(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name].cls is not cls:
            raise CliplabError(f"head name {name!r} is already registered by {_REGISTRY[name].cls.__name__}")
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        _REGISTRY[name] = HeadEntry(name, cls, family, paper, summary)
        return cls

    return decorate


def get_head(name: str) -> type:
    """The head class registered as ``name``."""
    if name not in _REGISTRY:
        raise CliplabError(f"unknown method {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name].cls


def list_heads(family: str | None = None) -> list[HeadEntry]:
    """Registered heads, optionally of one family, sorted by name."""
    return sorted((e for e in _REGISTRY.values() if family in (None, e.family)), key=lambda e: e.name)
