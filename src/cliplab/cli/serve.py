"""``cliplab serve``: the search service and its web page over an index built by ``cliplab index build``."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import RunOptions, command, console


@command
def serve(
    index_dir: Path = typer.Option(..., "--index-dir", "-i", help="Index folder written by cliplab index build."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", "-p", min=0, max=65535, help="Port to listen on."),
    max_upload_mb: float = typer.Option(10.0, "--max-upload-mb", min=0.001, help="Largest accepted upload (MiB)."),
    run: RunOptions = None,
):
    """Serve an index over HTTP: web page at /, text and image search, zero-shot classify, API docs at /docs.

    The model defaults to the one the index was built with (when the index records it); a different model
    is refused. FAISS runs on one thread per query here (requests run concurrently instead).
    """
    import uvicorn

    from ..search import SearchIndex
    from ..service import create_app
    from .index import with_index_model

    index = SearchIndex.open(index_dir)  # a missing or broken index fails before the model loads
    run = with_index_model(run, index_dir)  # the model (and its options) the index was built with, unless --model
    backbone = run.load_backbone()
    index.check_model(backbone)
    app = create_app(index_dir, backbone, max_upload_bytes=int(max_upload_mb * 2**20))
    shown = "localhost" if host in ("127.0.0.1", "0.0.0.0", "::") else host
    console.print(f"serving {index.count} images ({index.index_type} index, model {index.model_id}) at "
                  f"http://{shown}:{port}/  (API docs: /docs; Ctrl+C stops)")
    uvicorn.run(app, host=host, port=port, log_level="warning" if run.quiet else "info")
