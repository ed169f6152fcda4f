"""``gatescope serve``: the live atlas, any neuron of any served atlas on demand.

Modules: ``catalog`` (the served atlases, their lazily loaded model and on-disk page
cache), ``table`` (the neuron table: columns, filters, sorting, pages) and ``app`` (the
FastAPI routes, HTML and JSON, and their error answers). FastAPI and uvicorn load only
when a server starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["serve"]


def serve(
    atlases: Sequence[str | Path],
    *,
    model: str | None = None,
    corpus: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    on_ready=None,
) -> None:
    """Serves ``atlases`` on ``host:port`` until interrupted.

    ``on_ready(url)`` is called once the server listens (e.g. to print where).
    """
    import uvicorn

    from gatescope.serve.app import create_app
    from gatescope.serve.catalog import Catalog

    app = create_app(Catalog.open(atlases, model=model, corpus=corpus))
    config = uvicorn.Config(app, host=host, port=port, log_level="warning")
    server = uvicorn.Server(config)
    if on_ready is not None:
        startup = server.startup

        async def announce(sockets=None) -> None:
            await startup(sockets)
            bound = server.servers[0].sockets[0].getsockname() if server.servers else (host, port)
            on_ready(f"http://{bound[0]}:{bound[1]}/")

        server.startup = announce  # type: ignore[method-assign]
    server.run()
