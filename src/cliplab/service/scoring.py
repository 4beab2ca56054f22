"""``POST /score``: CLIP-S of captions for an uploaded image, and RefCLIP-S given references (paper 47).

The scores are ``eval.captions``'s (CLIPScore's code: the ``"A photo depicts"`` prefix on captions and references,
``w * max(cos, 0)`` with ``w = 2.5``, RefCLIP-S the harmonic mean with the raw best reference cosine). The upload
goes through the service's bounded decoding section (``uploads.prepare_upload``); captions are embedded without the
feature cache, so texts sent to the service never reach the disk.
"""

from __future__ import annotations

from fastapi import APIRouter, File, Form, HTTPException, UploadFile
from pydantic import BaseModel, Field

from ..eval.captions import PROMPT, W, clip_s, prompted, refclip_s
from .uploads import prepare_upload

MAX_CAPTIONS = 64
MAX_CAPTION_CHARS = 1000


class ErrorOut(BaseModel):
    detail: str = Field(description="What went wrong, in one line.")


class CaptionScoreOut(BaseModel):
    caption: str
    clip_s: float = Field(description="w * max(cos(image, prompt + caption), 0).")
    refclip_s: float | None = Field(None, description="Harmonic mean of CLIP-S and the best reference cosine "
                                                      "(when references are given).")


class ScoreOut(BaseModel):
    scores: list[CaptionScoreOut] = Field(description="One entry per caption, in the order given.")
    prompt: str
    w: float


def _texts(fields: list[str] | None, name: str, required: bool) -> list[str]:
    texts = [t.strip() for t in fields or [] if t.strip()]
    if required and not texts:
        raise HTTPException(422, f"{name}: give at least one (repeat the field for more)")
    if len(texts) > MAX_CAPTIONS:
        raise HTTPException(422, f"{name}: {len(texts)} given, at most {MAX_CAPTIONS}")
    if any(len(t) > MAX_CAPTION_CHARS for t in texts):
        raise HTTPException(422, f"{name}: one is longer than {MAX_CAPTION_CHARS} characters")
    return texts


def score_routes(backbone, max_upload_bytes: int) -> APIRouter:
    """The ``/score`` route over ``backbone`` (the service's model), uploads limited to ``max_upload_bytes``."""
    router = APIRouter()
    errors = {code: {"model": ErrorOut} for code in (400, 413, 415, 422, 503)}

    @router.post("/score", response_model=ScoreOut, responses=errors,
                 summary="CLIP-S (and RefCLIP-S with references) of captions for an image")
    def score(image: UploadFile = File(..., description="The image the captions describe."),
              captions: list[str] = Form(..., description=f"Captions (at most {MAX_CAPTIONS}), one per repeated "
                                                          "field."),
              references: list[str] | None = Form(None, description="Reference captions of the image (repeated "
                                                                    "field): adds RefCLIP-S."),
              ) -> ScoreOut:
        texts = _texts(captions, "captions", True)
        refs = _texts(references, "references", False)
        pixels = prepare_upload(image, max_upload_bytes, backbone.preprocess)
        features = backbone.encode_images(pixels.unsqueeze(0)).numpy()
        encoded = backbone.encode_texts(prompted(texts + refs, PROMPT)).numpy()
        caption_features, ref_features = encoded[:len(texts)], encoded[len(texts):]
        images = features.repeat(len(texts), axis=0)
        plain = clip_s(images, caption_features, W)
        ref = refclip_s(images, caption_features, [ref_features] * len(texts), W) if refs else None
        return ScoreOut(prompt=PROMPT, w=W, scores=[
            CaptionScoreOut(caption=t, clip_s=float(plain[n]), refclip_s=None if ref is None else float(ref[n]))
            for n, t in enumerate(texts)])

    return router
