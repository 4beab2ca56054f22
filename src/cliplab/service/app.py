"""FastAPI app over a search index: text and image search, zero-shot classification, images by id, a web page.

Images are served by integer id only (the index maps ids to files; no request ever names a path), with an
ETag of (index build, id, file size, mtime) and ``Cache-Control: no-cache``: ids are reassigned when an index
is rebuilt, so a browser revalidates (304 when unchanged) instead of showing another image from its cache.
Only regular image files still inside the indexed folder are served, checked when requested (``files.py``:
resolved path, no symlink or ``../`` escape unless the index was built with ``--serve-outside``, bytes PIL
identifies and verifies). Answers never carry a file system path: a hit's ``name`` is the file's base name
and its ``extra`` fields are cleaned (``sanitize_extra``: ``name`` made relative to the indexed folder or cut
to a base name, any other absolute-path value dropped), whatever the index stores.

Uploads are size-limited twice: an ASGI guard answers 413 as soon as the request body passes the limit (plus
room for the multipart framing), and each endpoint reads the file in chunks up to the limit. Reading, decoding
(PIL restricted to ``UPLOAD_FORMATS``, pixel guard, ``verify()``) and the model's preprocessing run inside one
bounded section (``uploads.py``: ``DECODE_SLOTS`` at once, ``PIXELS_IN_FLIGHT`` decoded pixels at most, a
bounded queue, then 503): only the model's input tensor waits for the model, so memory stays flat whatever the
number of requests. Every error answer is JSON ``{"detail": "<one message>"}``. Requests whose Host header is
not a name the server is served under are answered 400 (``hosts.py``, DNS rebinding).

Endpoints are plain functions, so FastAPI runs them in its threadpool. Each request answers from one snapshot
of the index (``reload.py``): a version published by ``cliplab index update`` is loaded on the next request and
swapped in atomically, requests under way finish on the one they started with. The model's forward passes run
without a lock (PyTorch inference is thread-safe); a lock per snapshot guards its FAISS search and SQLite rows,
held only for the search itself. ``/classify`` label sets (``labels.py``) are computed outside any shared lock,
kept in memory (least recently used dropped) and, with a ``label_cache_dir``, on disk within bounds.
``create_app`` changes two process-wide settings: glibc's mmap threshold (``uploads.map_large_buffers``) and
FAISS's thread count. FAISS runs
single-threaded in the server (``faiss.omp_set_num_threads(1)``, set by ``create_app``): a single query gains
nothing from OpenMP, and concurrent requests each spinning up an OpenMP team contend badly (measured 68 ms
against 2 ms per query under contention); concurrency comes from the threadpool.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from scipy.special import softmax
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import CliplabError
from .files import NotServed
from .hosts import AllowedHosts, HostGuard
from .labels import LabelSets
from .reload import LiveIndex
from .reload import build_id as _build_id  # noqa: F401 - the name tests and callers know
from .scoring import score_routes
from .uploads import (  # noqa: F401 - re-exported: the upload rules are part of this module's contract
    DECODE_SLOTS,
    DRAFT_SIDE,
    FORMATS_HINT,
    MAX_PIXELS,
    PIXELS_IN_FLIGHT,
    UPLOAD_FORMATS,
    decode_image,
    map_large_buffers,
    prepare_upload,
    read_upload,
)

STATIC = Path(__file__).resolve().parent / "static"
DOCS_ASSETS = "/docs-assets"  # Swagger UI and ReDoc served from an installed package, never a CDN: /docs works offline
MAX_K = 100
DEFAULT_K = 20
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
    model: str = Field("", description="The model as it was named (--model: recipe:NAME, a path, ARCH:TAG), for "
                                       "people; model_id is its identity.")
    count: int
    dim: int
    index_type: str
    version: str
    reload_error: str | None = Field(None, description="Set while a newer published index version could not be "
                                                       "loaded (the previous one is served).")


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


def image_etag(build_id: str, image_id: int, size: int, mtime_ns: int) -> str:
    """A strong ETag of an image as served: the index build, the id, and the file's size and mtime."""
    return '"' + hashlib.sha256(f"{build_id}:{image_id}:{size}:{mtime_ns}".encode()).hexdigest()[:32] + '"'


def _matches(if_none_match: str | None, tag: str) -> bool:
    """Whether an If-None-Match header names ``tag`` (or ``*``); weak tags compare equal to strong ones."""
    if not if_none_match:
        return False
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or tag in tags


def _offline_docs(app: FastAPI) -> None:
    """/docs (Swagger UI) and /redoc with their scripts, styles and icon from the installed fastapi-offline
    package under /docs-assets, so the API documentation renders on a machine without internet access."""
    from importlib.resources import files

    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html

    app.mount(DOCS_ASSETS, StaticFiles(directory=str(files("fastapi_offline") / "static")), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def _swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} - API",
                                   swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png")

    @app.get("/redoc", include_in_schema=False)
    async def _redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url=app.openapi_url, title=f"{app.title} - API",
                              redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js",
                              redoc_favicon_url=f"{DOCS_ASSETS}/favicon.png", with_google_fonts=False)


def create_app(index_dir, backbone, *, max_upload_bytes: int = 10 * 2**20, allowed_hosts: AllowedHosts | None = None,
               label_cache_dir: str | Path | None = None) -> FastAPI:
    """The search service over the index in ``index_dir``, queried with ``backbone`` (checked against it).

    ``allowed_hosts``: the Host headers answered (default: those of a loopback bind, ``localhost``,
    ``127.0.0.1``, ``::1``; ``cliplab serve`` passes its ``--host`` and ``--allowed-hosts``).
    ``label_cache_dir``: where ``/classify`` label sets are kept on disk (bounded; default: memory only).
    Raises ``SearchIndexError`` for a missing or broken index and ``ModelMismatchError`` when ``backbone``
    is not the model the index was built with.
    """
    live = LiveIndex(index_dir, backbone)
    single_threaded_faiss()
    map_large_buffers()  # decoded pictures go back to the system when freed (uploads.py)
    page = (STATIC / "index.html").read_text()

    def compute_label_head(names: list[str]):
        """The fitted zero-shot head of a label set, built as ``cliplab classify`` builds it (one provider,
        ``eval.inputs.build_head``); its prompt embeddings go to a scratch cache removed right after, so
        labels sent to the service never pile up in the feature cache."""
        from ..eval.inputs import build_head, for_single_images

        with tempfile.TemporaryDirectory(prefix="cliplab-labels-") as scratch:
            return for_single_images(build_head(CLASSIFY_METHOD, backbone, names, cache_dir=scratch).fit())

    label_sets = LabelSets(compute_label_head, {"model_id": backbone.model_id, "method": CLASSIFY_METHOD,
                                                "templates": CLASSIFY_TEMPLATES,
                                                "tokenizer": getattr(backbone, "tokenizer_id", None)},
                           label_cache_dir, dim=int(backbone.embed_dim), memory=LABEL_SETS)

    app = FastAPI(title="cliplab search", version=__version__, docs_url=None, redoc_url=None,
                  description="Search an indexed image collection by text or by image, classify an image "
                              "zero-shot, fetch indexed images by id. The web page is at /. A request whose "
                              "Host header is not a name the server is served under is answered 400.")
    app.state.live, app.state.backbone, app.state.max_upload_bytes = live, backbone, max_upload_bytes
    app.state.label_sets = label_sets
    app.add_middleware(UploadLimit, limit=max_upload_bytes + FORM_OVERHEAD)
    app.add_middleware(HostGuard, allowed=allowed_hosts if allowed_hosts is not None else AllowedHosts())
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _offline_docs(app)
    app.include_router(score_routes(backbone, max_upload_bytes))  # POST /score (scoring.py)

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

    def hits_out(hits, root: str | None) -> list[HitOut]:
        return [HitOut(id=h.id, score=float(h.score), caption=h.caption, extra=sanitize_extra(h.extra, root),
                       url=f"/images/{h.id}", name=public_name(h.path) if h.path else "") for h in hits]

    def label_head(names: list[str]):
        """The zero-shot head of a label set (``labels.LabelSets``: computed once, outside any shared lock)."""
        return label_sets.get(names)

    def query_image(image: UploadFile) -> np.ndarray:
        """The uploaded image's embedding: read, decoded and preprocessed in the bounded section, then encoded."""
        pixels = prepare_upload(image, max_upload_bytes, backbone.preprocess)
        return backbone.encode_images(pixels.unsqueeze(0)).numpy().astype(np.float32)

    @app.get("/", include_in_schema=False)
    def home() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/healthz", response_model=HealthOut, summary="Service and index status")
    def healthz() -> HealthOut:
        index = live.current().index
        return HealthOut(status="ok", model_id=index.model_id, model=getattr(backbone, "display_name", ""),
                         count=index.count, dim=index.dim,
                         index_type=str(index.index_type), version=__version__, reload_error=live.error)

    @app.get("/search", response_model=SearchOut, responses=_errors(400, 422), summary="Search images by text")
    def search(q: str = Query(..., min_length=1, max_length=MAX_QUERY_CHARS, description="What to look for."),
               k: int = Query(DEFAULT_K, ge=1, le=MAX_K, description="How many results.")) -> SearchOut:
        text = q.strip()
        if not text:
            raise _fail(422, "q: the query is empty; type some words to search for")
        snapshot = live.current()
        query = snapshot.index.text_vector(backbone, text)  # the forward pass: no lock
        with snapshot.lock:
            hits = snapshot.index.search_vectors(query, k)[0]
        return SearchOut(k=k, hits=hits_out(hits, snapshot.root))

    @app.post("/search/image", response_model=SearchOut, responses=_errors(400, 413, 415, 422, 503),
              summary="Search images by an example image")
    def search_image(image: UploadFile = File(..., description="The query image."),
                     k: int = Query(DEFAULT_K, ge=1, le=MAX_K, description="How many results.")) -> SearchOut:
        query = query_image(image)
        snapshot = live.current()
        with snapshot.lock:
            hits = snapshot.index.search_vectors(query, k)[0]
        return SearchOut(k=k, hits=hits_out(hits, snapshot.root))

    @app.post("/classify", response_model=ClassifyOut, responses=_errors(400, 413, 415, 422, 503),
              summary="Zero-shot classification of an image among the given labels")
    def classify(image: UploadFile = File(..., description="The image to classify."),
                 labels: list[str] = Form(..., description=f"Labels (at most {MAX_LABELS}): one per repeated "
                                                           "field (commas kept), or one comma-separated field.")
                 ) -> ClassifyOut:
        names = parse_labels(labels)
        pixels = prepare_upload(image, max_upload_bytes, backbone.preprocess)
        head = label_head(names)
        features = backbone.encode_images(pixels.unsqueeze(0)).numpy()
        logits = head.logit_scale_ * (np.asarray(features, np.float64) @ head.weights_)  # gives class_weights
        probabilities = [float(p) for p in softmax(logits, axis=1)[0]]
        ranked = sorted(zip(names, probabilities), key=lambda pair: -pair[1])
        return ClassifyOut(labels=names, probabilities=probabilities, templates=CLASSIFY_TEMPLATES,
                           predictions=[LabelProbability(label=n, probability=p) for n, p in ranked])

    @app.get("/images/{image_id}", response_class=StreamingResponse, responses=_errors(403, 404, 422),
             summary="An indexed image's bytes, by id (a regular image file inside the indexed folder)")
    def image_bytes(request: Request,
                    image_id: int = PathParam(..., ge=0, le=MAX_ID, description="The id from a search hit.")):
        snapshot = live.current()
        with snapshot.lock:  # the index's own messages name folders: the answers below name only the id
            row = snapshot.index.item(image_id)
        if row is None:
            raise _fail(404, f"no image with id {image_id} in the index")
        try:
            opened = snapshot.files.open(row["path"], row["size"], row["mtime"])
        except NotServed as refused:
            raise _fail(refused.status, f"the image of id {image_id} {refused.reason}") from None
        facts = opened.stat
        tag = image_etag(snapshot.build_id, image_id, facts.st_size, facts.st_mtime_ns)
        headers = {"ETag": tag, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
                   "Content-Length": str(facts.st_size)}
        if _matches(request.headers.get("if-none-match"), tag):
            opened.close()
            headers.pop("Content-Length")
            return Response(status_code=304, headers=headers)
        return StreamingResponse(opened.chunks(), media_type=opened.media_type, headers=headers,
                                 background=BackgroundTask(opened.close))

    return app
