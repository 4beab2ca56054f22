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
    allowed_hosts: list[str] = typer.Option(
        [], "--allowed-hosts", metavar="NAME", help="Other names the server is reached by (repeat, or comma-separated; "
                                    "*.example.org for sub-domains, * for any). Requests naming another Host are "
                                    "refused (DNS rebinding); the bound address (and localhost for a loopback "
                                    "bind) is always allowed."),
    label_cache: Path | None = typer.Option(
        None, "--label-cache", help="Where /classify keeps label sets on disk, bounded (default: "
                                    "$CLIPLAB_CACHE/service-labels)."),
    max_connections: int = typer.Option(256, "--max-connections", min=1,
                                        help="Open connections served at once; more are answered 503."),
    run: RunOptions = None,
):
    """Serve an index over HTTP: web page at /, text and image search, zero-shot classify, API docs at /docs.

    The model defaults to the one the index was built with (when the index records it); a different model
    is refused. FAISS runs on one thread per query here (requests run concurrently instead). A newer version
    of the index (cliplab index update or build) is picked up on the next request.
    """
    import uvicorn

    from ..fileio import default_cache_root
    from ..search import SearchIndex
    from ..service import create_app
    from ..service.hosts import AllowedHosts
    from .index import with_index_model

    index = SearchIndex.open(index_dir)  # a missing or broken index fails before the model loads
    run = with_index_model(run, index_dir)  # the model (and its options) the index was built with, unless --model
    backbone = run.load_backbone()
    index.check_model(backbone)
    hosts = AllowedHosts(host, allowed_hosts)
    app = create_app(index_dir, backbone, max_upload_bytes=int(max_upload_mb * 2**20), allowed_hosts=hosts,
                     label_cache_dir=label_cache or default_cache_root() / "service-labels")
    shown = "localhost" if host in ("127.0.0.1", "0.0.0.0", "::") else host
    console.print(f"serving {index.count} images ({index.index_type} index, model {index.model_id}) at "
                  f"http://{shown}:{port}/  (API docs: /docs; Ctrl+C stops)")
    if not run.quiet:
        console.print(f"answering requests addressed to: {hosts.describe()}")
    uvicorn.run(app, host=host, port=port, log_level="warning" if run.quiet else "info",
                limit_concurrency=max_connections)
