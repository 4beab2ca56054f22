"""Search over embedded images: ``build_index`` / ``update_index`` write a FAISS + SQLite folder,
``SearchIndex.open`` queries it by text, image or vector; ``contact_sheet`` draws the hits.

Names are imported on first use (PEP 562), so importing the package loads neither FAISS nor torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_LAZY = {
    "CaptionHit": "index", "Hit": "index", "IndexReport": "index", "SearchIndex": "index", "build_index": "index",
    "index_spec": "index", "update_index": "index", "EXACT_MAX": "index", "contact_sheet": "sheet",
}

__all__ = ["EXACT_MAX", "CaptionHit", "Hit", "IndexReport", "SearchIndex", "build_index", "contact_sheet",
           "index_spec", "update_index"]

if TYPE_CHECKING:
    from .index import EXACT_MAX, CaptionHit, Hit, IndexReport, SearchIndex, build_index, index_spec, update_index
    from .sheet import contact_sheet


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
