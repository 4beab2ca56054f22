"""FastAPI app over a search index: text and image search, zero-shot classification, images by id, a web page.

Images are served by integer id only (the index maps ids to files; no request ever names a path), with an
ETag of (index build, id, file size, mtime) and ``Cache-Control: no-cache``: ids are reassigned when an index
is rebuilt, so a browser revalidates (304 when unchanged) instead of showing another image from its cache.
Answers never carry a file system path: a hit's ``name`` is the file's base name and its ``extra`` fields are
cleaned (``sanitize_extra``: ``name`` made relative to the indexed folder or cut to a base name, any other
absolute-path value dropped), whatever the index stores (a shards-built index stores absolute paths).

Uploads are size-limited twice: an ASGI guard answers 413 as soon as the request body passes the limit (plus
room for the multipart framing), and each endpoint reads the file in chunks up to the limit. Images are
decoded by PIL restricted to ``UPLOAD_FORMATS`` (anything else, TIFF, EPS, PSD..., is a 415 before a decoder
runs), with a pixel-count guard (decompression bombs: 413), ``verify()``, JPEG draft-mode downscaling and a
conversion to RGB; at most ``DECODE_SLOTS`` uploads decode at once, which bounds the decoding memory whatever
the number of concurrent requests. Every error answer is JSON ``{"detail": "<one message>"}``.

Endpoints are plain functions, so FastAPI runs them in its threadpool. The model's forward passes run
without a lock (PyTorch inference is thread-safe); one lock guards the FAISS search and the SQLite rows, held
only for the search itself. ``/classify`` embeds a new label set through ``cliplab.features.text`` (prompt
embeddings cached on disk) under its own lock, never under the index lock, so a new label set cannot stall
searches. FAISS runs single-threaded in the server (``faiss.omp_set_num_threads(1)``, set by ``create_app``):
a single query gains nothing from OpenMP, and concurrent requests each spinning up an OpenMP team contend
badly (measured 68 ms against 2 ms per query under contention); concurrency comes from the threadpool.
"""

from __future__ import annotations

import hashlib
import io
import mimetypes
import os
import re
import threading
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, ImageOps
from pydantic import BaseModel, Field
from scipy.special import softmax
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import CliplabError

STATIC = Path(__file__).resolve().parent / "static"
MAX_K = 100
DEFAULT_K = 20
# An upload with more pixels is refused before it is decoded (413). 24 Mpx admits full-size photos of common
# cameras (6000x4000) while one decoded RGB image stays under about 72 MB (a few copies during conversion):
# with DECODE_SLOTS concurrent decodes, a few hundred MB at most, whatever the number of requests.
MAX_PIXELS = 24_000_000
UPLOAD_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP")  # the only decoders PIL may run on an upload
FORMATS_HINT = "upload a JPEG, PNG, GIF, WebP or BMP file"
DECODE_SLOTS = 3  # uploads decoded at the same time (the others wait): bounds decoding memory
DRAFT_SIDE = 512  # JPEGs are decoded at the smallest 1/2, 1/4, 1/8 scale keeping both sides >= this
_DECODING = threading.BoundedSemaphore(DECODE_SLOTS)
MAX_QUERY_CHARS = 1000
MAX_LABELS = 64
LABEL_SETS = 64  # label-set weights kept in memory (least recently used dropped)
MAX_LABEL_CHARS = 200
CLASSIFY_METHOD = "zeroshot"  # the head `cliplab classify` builds by default, with its declared default templates
CLASSIFY_TEMPLATES = "imagenet7"  # what that default is without a dataset (a test checks it against the provider)
FORM_OVERHEAD = 64 * 1024  # multipart boundaries, part headers and small form fields around an upload
CHUNK = 1 << 20
MAX_ID = 2**63 - 1


class ErrorOut(BaseModel):
    detail: str = Field(description="What went wrong, in one line.")


class HitOut(BaseModel):
    id: int = Field(description="The image's id in the index.")
    score: float = Field(description="Cosine similarity to the query.")
    caption: str | None = None
    extra: dict = Field(default_factory=dict, description="Stored fields (name, label...); never a file path.")
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
    """Decode untrusted bytes to an RGB image: only ``UPLOAD_FORMATS`` (else 415), pixel guard (413),
    ``verify()``, JPEG draft downscaling, EXIF rotation; at most ``DECODE_SLOTS`` decodes at once."""
    with _DECODING:
        return _decode(data, max_pixels)


def _decode(data: bytes, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            probe = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
            width, height = probe.size
            if width * height > max_pixels:
                raise _fail(413, f"image too large: {width}x{height} pixels (limit {max_pixels:,} pixels)")
            probe.verify()
            image = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
            if image.format == "JPEG" and min(width, height) >= 2 * DRAFT_SIDE:
                image.draft("RGB", (DRAFT_SIDE, DRAFT_SIDE))  # DCT scaling: a fraction of the work and memory
            image.load()
            return ImageOps.exif_transpose(image).convert("RGB")
    except HTTPException:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _fail(413, f"image too large: {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        raise _fail(415, f"not an image in an accepted format; {FORMATS_HINT}") from exc
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, struct.error...) on bad files
        raise _fail(415, f"not a readable image ({type(exc).__name__}: {str(exc)[:200]}); {FORMATS_HINT}") from exc


_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


def is_absolute_path(value: str) -> bool:
    """Whether ``value`` names a file by an absolute path (POSIX, ``~``, Windows drive or UNC, ``file:`` URI)."""
    text = value.strip()
    return (text.startswith(("/", "~", "\\\\")) or bool(_DRIVE.match(text)) or text.lower().startswith("file:"))


def public_name(value: str, root: str | None = None) -> str:
    """A stored file name as the service may show it: relative to ``root`` when inside it, else the base name."""
    if not is_absolute_path(value):
        return value
    if root:
        try:
            relative = os.path.relpath(value, root)
        except ValueError:
            relative = ""
        if relative and not relative.startswith("..") and not is_absolute_path(relative):
            return Path(relative).as_posix()
    return re.split(r"[\\/]", value.rstrip("/\\"))[-1]


def sanitize_extra(extra: dict | None, root: str | None = None) -> dict:
    """``extra`` without file system paths: ``name`` made relative to ``root`` (or cut to its base name); any
    other value that is an absolute path dropped, in nested lists and mappings too."""

    def clean(value):
        if isinstance(value, str):
            return None if is_absolute_path(value) else value
        if isinstance(value, dict):
            return {k: v for k, v in ((k, clean(v)) for k, v in value.items()) if v is not None}
        if isinstance(value, list | tuple):
            return [v for v in (clean(v) for v in value) if v is not None]
        return value

    out = {}
    for key, value in (extra or {}).items():
        if key == "name" and isinstance(value, str):
            out[key] = public_name(value, root)
        elif (cleaned := clean(value)) is not None:
            out[key] = cleaned
    return out


def parse_labels(fields: list[str]) -> list[str]:
    """Labels: one per repeated form field (commas kept: "hot dog, sausage" is one label), or a single field
    split on commas; 422 when none, duplicated, too many or too long."""
    parts = fields[0].split(",") if len(fields) == 1 else fields
    labels = [part.strip() for part in parts if part.strip()]
    if not labels:
        raise _fail(422, "labels: give at least one label (one comma-separated field or repeated fields)")
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


def single_threaded_faiss() -> None:
    """FAISS searches on one OpenMP thread in the server (see the module docstring); a no-op without faiss."""
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss is a dependency of the search index
        return
    faiss.omp_set_num_threads(1)


def _build_id(index) -> str:
    """What identifies this build of the index: its manifest's digest (ids are reassigned by a rebuild)."""
    try:
        return hashlib.sha256((Path(index.root) / "manifest.json").read_bytes()).hexdigest()[:16]
    except OSError:
        return hashlib.sha256(repr(sorted((getattr(index, "manifest", None) or {}).items())).encode()).hexdigest()[:16]


def image_etag(build_id: str, image_id: int, size: int, mtime_ns: int) -> str:
    """A strong ETag of an image as served: the index build, the id, and the file's size and mtime."""
    return '"' + hashlib.sha256(f"{build_id}:{image_id}:{size}:{mtime_ns}".encode()).hexdigest()[:32] + '"'


def _matches(if_none_match: str | None, tag: str) -> bool:
    """Whether an If-None-Match header names ``tag`` (or ``*``); weak tags compare equal to strong ones."""
    if not if_none_match:
        return False
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or tag in tags


def create_app(index_dir, backbone, *, max_upload_bytes: int = 10 * 2**20) -> FastAPI:
    """The search service over the index in ``index_dir``, queried with ``backbone`` (checked against it).

    Raises ``SearchIndexError`` for a missing or broken index and ``ModelMismatchError`` when ``backbone``
    is not the model the index was built with.
    """
    from ..search import SearchIndex

    index = SearchIndex.open(index_dir)
    index.check_model(backbone)
    single_threaded_faiss()
    lock = threading.Lock()  # the FAISS index and its rows
    labels_lock = threading.Lock()  # label-set weights: one new set embedded at a time, never under `lock`
    weights: OrderedDict[tuple[str, ...], object] = OrderedDict()  # label set -> its fitted zero-shot head
    page = (STATIC / "index.html").read_text()
    build_id = _build_id(index)
    source = (getattr(index, "manifest", None) or {}).get("source") or {}
    root = source.get("location") if source.get("kind") == "folder" else None

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
        return [HitOut(id=h.id, score=float(h.score), caption=h.caption, extra=sanitize_extra(h.extra, root),
                       url=f"/images/{h.id}", name=public_name(h.path) if h.path else "") for h in hits]

    def label_head(names: list[str]):
        """The fitted zero-shot head of a label set, built as ``cliplab classify`` builds it (one provider,
        ``eval.inputs.build_head``): cached in memory, prompt embeddings cached on disk."""
        from ..eval.inputs import build_head, for_single_images

        key = tuple(names)
        with labels_lock:
            found = weights.get(key)
            if found is None:
                found = for_single_images(build_head(CLASSIFY_METHOD, backbone, names).fit())
                weights[key] = found
                while len(weights) > LABEL_SETS:
                    weights.popitem(last=False)
            weights.move_to_end(key)
            return found

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
        query = index.text_vector(backbone, text)  # the forward pass: no lock
        with lock:
            hits = index.search_vectors(query, k)[0]
        return SearchOut(k=k, hits=hits_out(hits))

    @app.post("/search/image", response_model=SearchOut, responses=_errors(400, 413, 415, 422),
              summary="Search images by an example image")
    def search_image(image: UploadFile = File(..., description="The query image."),
                     k: int = Query(DEFAULT_K, ge=1, le=MAX_K, description="How many results.")) -> SearchOut:
        picture = decode_image(read_upload(image, max_upload_bytes))
        query = index.image_vector(backbone, picture)
        with lock:
            hits = index.search_vectors(query, k)[0]
        return SearchOut(k=k, hits=hits_out(hits))

    @app.post("/classify", response_model=ClassifyOut, responses=_errors(400, 413, 415, 422),
              summary="Zero-shot classification of an image among the given labels")
    def classify(image: UploadFile = File(..., description="The image to classify."),
                 labels: list[str] = Form(..., description=f"Labels (at most {MAX_LABELS}): one per repeated "
                                                           "field (commas kept), or one comma-separated field.")
                 ) -> ClassifyOut:
        names = parse_labels(labels)
        picture = decode_image(read_upload(image, max_upload_bytes))
        head = label_head(names)
        features = backbone.encode_images(backbone.preprocess(picture).unsqueeze(0)).numpy()
        logits = head.logit_scale_ * (np.asarray(features, np.float64) @ head.weights_)  # gives class_weights
        probabilities = [float(p) for p in softmax(logits, axis=1)[0]]
        ranked = sorted(zip(names, probabilities), key=lambda pair: -pair[1])
        return ClassifyOut(labels=names, probabilities=probabilities, templates=CLASSIFY_TEMPLATES,
                           predictions=[LabelProbability(label=n, probability=p) for n, p in ranked])

    @app.get("/images/{image_id}", response_class=FileResponse, responses=_errors(404, 422),
             summary="An indexed image's bytes, by id")
    def image_bytes(request: Request,
                    image_id: int = PathParam(..., ge=0, le=MAX_ID, description="The id from a search hit.")):
        with lock:  # the index's own messages name folders: the answers below name only the id
            if index.item(image_id) is None:
                raise _fail(404, f"no image with id {image_id} in the index")
            try:
                path = Path(index.image_file(image_id))
            except CliplabError:
                path = None
        try:
            stat = path.stat() if path is not None and path.is_file() else None
        except OSError:
            stat = None
        if stat is None:
            raise _fail(404, f"the image of id {image_id} is no longer on disk; run `cliplab index update`")
        tag = image_etag(build_id, image_id, stat.st_size, stat.st_mtime_ns)
        headers = {"ETag": tag, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
        if _matches(request.headers.get("if-none-match"), tag):
            return Response(status_code=304, headers=headers)
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media_type, headers=headers, stat_result=stat)

    return app
