"""Contact sheet: the hits of a search as one PNG grid of thumbnails titled with rank and score."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..errors import CliplabError, ImageDecodeError
from ..fileio import atomic_write

TILE = 160
TITLE = 22
COLUMNS = 5


def sheet_size(count: int, columns: int = COLUMNS, tile: int = TILE) -> tuple[int, int]:
    """(width, height) in pixels of the sheet of ``count`` hits."""
    cols = max(1, min(columns, count))
    rows = max(1, math.ceil(count / cols))
    return cols * tile, rows * (tile + TITLE)


def contact_sheet(hits: Sequence, output: str | Path, *, columns: int = COLUMNS, tile: int = TILE) -> Path:
    """Write a PNG grid of the ``hits`` (``Hit`` objects, best first) to ``output``; a file that cannot be
    read is drawn as a grey tile. Each title is ``#rank  score``."""
    from ..data.images import load_image

    if not hits:
        raise CliplabError("no hits to draw on a contact sheet")
    width, height = sheet_size(len(hits), columns, tile)
    cols = width // tile
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for rank, hit in enumerate(hits):
        x, y = (rank % cols) * tile, (rank // cols) * (tile + TITLE)
        try:
            image = load_image(hit.path)
            image.thumbnail((tile - 4, tile - 4))
        except (ImageDecodeError, OSError):
            image = Image.new("RGB", (tile - 4, tile - 4), (200, 200, 200))
        sheet.paste(image, (x + (tile - image.width) // 2, y + TITLE + (tile - image.height) // 2))
        draw.text((x + 4, y + 4), f"#{rank + 1}  {hit.score:.3f}", fill="black", font=font)
    output = Path(output)
    return atomic_write(output, lambda handle: sheet.save(handle, format="PNG"))
