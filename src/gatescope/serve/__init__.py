"""``gatescope serve``: the live atlas, any neuron of any served atlas on demand.

Modules: ``catalog`` (the served atlases, their lazily loaded model and weights, and their
on-disk caches), ``table`` (the neuron table: columns, filters, sorting, pages), ``views``
(the model-wide views), ``search`` (search by token), ``probe`` (any text through the
model) and ``app`` (the FastAPI routes, HTML and JSON, and their error answers). FastAPI
and uvicorn load only when a server starts.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from pathlib import Path

from gatescope.errors import GatescopeError

__all__ = ["listen", "serve"]


def serve(
    atlases: Sequence[str | Path],
    *,
    model: str | None = None,
    corpus: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serves ``atlases`` on ``host:port`` (``port`` 0: any free one) until interrupted.

    ``on_ready(url)`` is called once the server listens (e.g. to print where).
    """
    import uvicorn

    from gatescope.serve.app import create_app
    from gatescope.serve.catalog import Catalog

    app = create_app(Catalog.open(atlases, model=model, corpus=corpus))
    listening = listen(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    if on_ready is not None:
        startup = server.startup

        async def announce(sockets=None) -> None:
            await startup(sockets)
            bound_host, bound_port = listening.getsockname()[:2]
            shown = f"[{bound_host}]" if ":" in bound_host else bound_host  # IPv6 in brackets
            on_ready(f"http://{shown}:{bound_port}/")

        server.startup = announce  # type: ignore[method-assign]
    with listening:
        server.run(sockets=[listening])


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port``, or a sentence saying why it cannot be."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise GatescopeError(
            f"cannot serve on {host}:{port} ({error.strerror}): pass --port with a free "
            "port, or --port 0 for any."
        ) from error
    return sock
