"""FastAPI app over a search index: text and image search, zero-shot classification, images by id, a web page.

Images are served by integer id only (the index maps ids to files; no request ever names a path). Uploads
are size-limited twice: an ASGI guard answers 413 as soon as the request body passes the limit (plus room
for the multipart framing), and each endpoint reads the file in chunks up to the limit. Images are decoded
by PIL with a pixel-count guard (decompression bombs: 413), ``verify()`` and a conversion to RGB; anything
PIL cannot read is a 415. Every error answer is JSON ``{"detail": "<one message>"}``.

Endpoints are plain functions, so FastAPI runs them in its threadpool; one lock serialises the model and
the index (SQLite connections and some inference runtimes are not thread-safe).
"""

from __future__ import annotations

import io
import mimetypes
import threading
import warnings
from collections import OrderedDict
from pathlib import Path

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image, ImageOps
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import CliplabError

STATIC = Path(__file__).resolve().parent / "static"
MAX_K = 100
DEFAULT_K = 20
MAX_PIXELS = 40_000_000  # an upload decoding to more pixels is refused before it is decoded (413)
MAX_QUERY_CHARS = 1000
MAX_LABELS = 256
MAX_LABEL_CHARS = 200
CLASSIFY_TEMPLATES = "imagenet7"  # the template set `cliplab classify` uses by default
FORM_OVERHEAD = 64 * 1024  # multipart boundaries, part headers and small form fields around an upload
CHUNK = 1 << 20
MAX_ID = 2**63 - 1


class ErrorOut(BaseModel):
    detail: str = Field(description="What went wrong, in one line.")


class HitOut(BaseModel):
    id: int = Field(description="The image's id in the index.")
    score: float = Field(description="Cosine similarity to the query.")
    caption: str | None = None
    extra: dict = Field(default_factory=dict)
    url: str = Field(description="Where the image is served: /images/{id}.")
    name: str = Field(description="The file's base name (never its path).")


class SearchOut(BaseModel):
    k: int
    hits: list[HitOut]


class HealthOut(BaseModel):
    status: str
    model_id: str
    count: int
    dim: int
    index_type: str
    version: str


class LabelProbability(BaseModel):
    label: str
    probability: float


class ClassifyOut(BaseModel):
    labels: list[str] = Field(description="The labels, in the order given.")
    probabilities: list[float] = Field(description="One probability per label, in the order given.")
    predictions: list[LabelProbability] = Field(description="The labels, most probable first.")
    templates: str


def _errors(*codes: int) -> dict:
    return {code: {"model": ErrorOut} for code in codes}


def _fail(status: int, detail: str) -> HTTPException:
    return HTTPException(status_code=status, detail=detail)


def _mib(n: int) -> str:
    return f"{n / 2**20:g} MiB"


def read_upload(upload: UploadFile, limit: int) -> bytes:
    """The uploaded file's bytes, read in chunks; 413 as soon as it passes ``limit``, 400 when it is empty."""
    chunks, total = [], 0
    upload.file.seek(0)
    while chunk := upload.file.read(CHUNK):
        total += len(chunk)
        if total > limit:
            raise _fail(413, f"upload larger than the {_mib(limit)} limit")
        chunks.append(chunk)
    if not total:
        raise _fail(400, "the uploaded file is empty")
    return b"".join(chunks)


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode untrusted bytes to an RGB image: pixel guard (413), ``verify()``, EXIF rotation; else 415."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            probe = Image.open(io.BytesIO(data))
            width, height = probe.size
            if width * height > max_pixels:
                raise _fail(413, f"image too large: {width}x{height} pixels (limit {max_pixels:,} pixels)")
            probe.verify()
            image = Image.open(io.BytesIO(data))
            image.load()
            return ImageOps.exif_transpose(image).convert("RGB")
    except HTTPException:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _fail(413, f"image too large: {exc}") from exc
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, struct.error...) on bad files
        raise _fail(415, f"not a readable image ({type(exc).__name__}: {str(exc)[:200]}); "
                    "upload a JPEG, PNG, GIF, WebP or BMP file") from exc


def parse_labels(fields: list[str]) -> list[str]:
    """Labels from repeated form fields, each possibly comma-separated; 422 when none, duplicated or too many."""
    labels = [part.strip() for field in fields for part in field.split(",") if part.strip()]
    if not labels:
        raise _fail(422, "labels: give at least one label (comma-separated or repeated form fields)")
    if len(labels) > MAX_LABELS:
        raise _fail(422, f"labels: {len(labels)} labels, at most {MAX_LABELS}")
    long = next((label for label in labels if len(label) > MAX_LABEL_CHARS), None)
    if long is not None:
        raise _fail(422, f"labels: a label is longer than {MAX_LABEL_CHARS} characters: {long[:40]!r}...")
    seen = set()
    for label in labels:
        if label in seen:
            raise _fail(422, f"labels: {label!r} is given twice")
        seen.add(label)
    return labels


class UploadLimit:
    """ASGI guard: 413 for a request body over ``limit`` bytes, decided from Content-Length or while reading.

    A body that passes the limit mid-stream stops being read: the app's answer (if any) is dropped and the
    413 is sent instead.
    """

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def _refuse(self, send) -> None:
        body = JSONResponse({"detail": f"upload larger than the {_mib(self.limit - FORM_OVERHEAD)} limit"},
                            status_code=413, headers={"Connection": "close"})
        await send({"type": "http.response.start", "status": 413, "headers": body.raw_headers})
        await send({"type": "http.response.body", "body": body.body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await self._refuse(send)
        seen, over, started = 0, False, False

        async def limited_receive():
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    over = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message):
            nonlocal started
            if over:
                return
            started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            pass
        except Exception:
            if not over:
                raise
        if over and not started:
            await self._refuse(send)


class _BodyTooLarge(Exception):
    pass


def create_app(index_dir, backbone, *, max_upload_bytes: int = 10 * 2**20) -> FastAPI:
    """The search service over the index in ``index_dir``, queried with ``backbone`` (checked against it).

    Raises ``SearchIndexError`` for a missing or broken index and ``ModelMismatchError`` when ``backbone``
    is not the model the index was built with.
    """
    from ..heads import create_head
    from ..search import SearchIndex

    index = SearchIndex.open(index_dir)
    index.check_model(backbone)
    lock = threading.Lock()
    heads: OrderedDict[tuple[str, ...], object] = OrderedDict()
    page = (STATIC / "index.html").read_text()

    app = FastAPI(title="cliplab search", version=__version__,
                  description="Search an indexed image collection by text or by image, classify an image "
                              "zero-shot, fetch indexed images by id. The web page is at /.")
    app.state.index, app.state.backbone, app.state.max_upload_bytes = index, backbone, max_upload_bytes
    app.add_middleware(UploadLimit, limit=max_upload_bytes + FORM_OVERHEAD)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        parts = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("query", "body", "path", "form"))
            parts.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
        return JSONResponse({"detail": "; ".join(parts) or "invalid request"}, status_code=422)

    @app.exception_handler(CliplabError)
    async def _cliplab_error(request: Request, exc: CliplabError):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    def hits_out(hits) -> list[HitOut]:
        return [HitOut(id=h.id, score=float(h.score), caption=h.caption, extra=dict(h.extra or {}),
                       url=f"/images/{h.id}", name=Path(h.path).name if h.path else "") for h in hits]

    @app.get("/", include_in_schema=False)
    def home() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/healthz", response_model=HealthOut, summary="Service and index status")
    def healthz() -> HealthOut:
        return HealthOut(status="ok", model_id=index.model_id, count=index.count, dim=index.dim,
                         index_type=str(index.index_type), version=__version__)

    @app.get("/search", response_model=SearchOut, responses=_errors(400, 422), summary="Search images by text")
    def search(q: str = Query(..., min_length=1, max_length=MAX_QUERY_CHARS, description="What to look for."),
               k: int = Query(DEFAULT_K, ge=1, le=MAX_K, description="How many results.")) -> SearchOut:
        text = q.strip()
        if not text:
            raise _fail(422, "q: the query is empty; type some words to search for")
        with lock:
            hits = index.search_text(backbone, text, k)
        return SearchOut(k=k, hits=hits_out(hits))

    @app.post("/search/image", response_model=SearchOut, responses=_errors(400, 413, 415, 422),
              summary="Search images by an example image")
    def search_image(image: UploadFile = File(..., description="The query image."),
                     k: int = Query(DEFAULT_K, ge=1, le=MAX_K, description="How many results.")) -> SearchOut:
        picture = decode_image(read_upload(image, max_upload_bytes))
        with lock:
            hits = index.search_image(backbone, picture, k)
        return SearchOut(k=k, hits=hits_out(hits))

    @app.post("/classify", response_model=ClassifyOut, responses=_errors(400, 413, 415, 422),
              summary="Zero-shot classification of an image among the given labels")
    def classify(image: UploadFile = File(..., description="The image to classify."),
                 labels: list[str] = Form(..., description="Labels: comma-separated, or one per repeated field.")
                 ) -> ClassifyOut:
        names = parse_labels(labels)
        picture = decode_image(read_upload(image, max_upload_bytes))
        key = tuple(names)
        with lock:
            head = heads.get(key)
            if head is None:
                head = create_head("zeroshot", backbone=backbone, class_names=names, templates=CLASSIFY_TEMPLATES)
                head.fit()
                heads[key] = head
                while len(heads) > 64:
                    heads.popitem(last=False)
            heads.move_to_end(key)
            features = backbone.encode_images(backbone.preprocess(picture).unsqueeze(0)).numpy()
            probabilities = [float(p) for p in head.predict_proba(features)[0]]
        ranked = sorted(zip(names, probabilities), key=lambda pair: -pair[1])
        return ClassifyOut(labels=names, probabilities=probabilities, templates=CLASSIFY_TEMPLATES,
                           predictions=[LabelProbability(label=n, probability=p) for n, p in ranked])

    @app.get("/images/{image_id}", response_class=FileResponse, responses=_errors(404, 422),
             summary="An indexed image's bytes, by id")
    def image_bytes(image_id: int = PathParam(..., ge=0, le=MAX_ID, description="The id from a search hit.")):
        with lock:  # the index's own messages name folders: the answers below name only the id
            if index.item(image_id) is None:
                raise _fail(404, f"no image with id {image_id} in the index")
            try:
                path = Path(index.image_file(image_id))
            except CliplabError:
                path = None
        if path is None or not path.is_file():
            raise _fail(404, f"the image of id {image_id} is no longer on disk; run `cliplab index update`")
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media_type,
                            headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "max-age=3600"})

    return app
