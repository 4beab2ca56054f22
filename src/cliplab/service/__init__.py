"""The search web service: a FastAPI app over a ``cliplab.search`` index, with a small web page.

``create_app(index_dir, backbone)`` builds the app; ``cliplab serve`` runs it under uvicorn.
"""

from .app import create_app

__all__ = ["create_app"]
