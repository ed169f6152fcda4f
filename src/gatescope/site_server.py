"""Serving a site folder of neuron pages on loopback (stdlib ``http.server``)."""

from __future__ import annotations

import functools
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from gatescope.errors import GatescopeError

__all__ = ["site_server"]

LOOPBACK = "127.0.0.1"


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # one line per request is noise
        pass


def site_server(folder: str | Path, port: int = 8000) -> ThreadingHTTPServer:
    """A server for the files of ``folder`` on 127.0.0.1 only (``port`` 0: any free port).

    Call ``serve_forever()`` on it; ``server_address[1]`` is the port it got.
    """
    handler = functools.partial(_QuietHandler, directory=str(folder))
    try:
        return ThreadingHTTPServer((LOOPBACK, port), handler)
    except OSError as error:
        raise GatescopeError(
            f"cannot serve on {LOOPBACK}:{port} ({error.strerror}): pass --port with a free "
            "port, or --port 0 for any."
        ) from error
