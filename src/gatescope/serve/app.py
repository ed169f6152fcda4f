"""The FastAPI application of ``gatescope serve``: HTML pages and the JSON API they show.

Routes (``NAME`` is an atlas's name in the catalog, ``L.N`` a neuron):

* ``/``: the atlases; ``/atlas/NAME/``: the neuron table (filter, sort, pages);
  ``/atlas/NAME/neuron/L.N``: a neuron's page, recomputed on first request and cached.
* ``/api/atlases``, ``/api/atlas/NAME/neurons``, ``/api/atlas/NAME/neuron/L.N``,
  ``/api/atlas/NAME/neuron/L.N/weights``: the same as JSON; ``/docs``: FastAPI's OpenAPI
  documentation (its assets are FastAPI's own).

Every failure of a request is an answer with one sentence: a GatescopeError (a user's
mistake) is 400, a missing atlas or neuron 404, a malformed parameter 422; HTML under
``/atlas/``, JSON under ``/api/``. The server keeps serving.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

from gatescope import __version__
from gatescope.errors import GatescopeError
from gatescope.serve.table import MAX_PAGE_SIZE

if TYPE_CHECKING:
    from gatescope.serve.catalog import Catalog, ServedAtlas
    from gatescope.serve.table import TablePage

__all__ = ["create_app"]

_NEURON = re.compile(r"(\d{1,9})\.(\d{1,9})")
_TABLE_DEFAULTS = {"filter": "", "sort": "layer", "order": "asc", "size": 50}


def create_app(catalog: Catalog) -> FastAPI:
    """The application serving ``catalog``'s atlases."""
    from gatescope.render import render_neuron, render_server_page

    app = FastAPI(title="gatescope", version=__version__, docs_url="/docs", redoc_url=None)

    def served(name: str) -> ServedAtlas:
        atlas = catalog.get(name)
        if atlas is None:
            raise HTTPException(404, f"there is no atlas '{name}' here.")
        return atlas

    def neuron_of(atlas: ServedAtlas, spec: str) -> tuple[int, int]:
        match = _NEURON.fullmatch(spec)
        if match is None:
            raise HTTPException(404, f"'{spec}' is not a neuron: write LAYER.NEURON, e.g. 3.141.")
        layer, neuron = int(match[1]), int(match[2])
        if layer >= atlas.atlas.num_layers or neuron >= atlas.atlas.d_mlp:
            raise HTTPException(
                404,
                f"the atlas '{atlas.name}' has no neuron {layer}.{neuron}: it has "
                f"{atlas.atlas.num_layers} layers of {atlas.atlas.d_mlp} neurons.",
            )
        return layer, neuron

    # ---------------------------------------------------------------- HTML

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return render_server_page("serve_index.html.j2", atlases=_atlases(catalog))

    @app.get("/atlas/{name}", include_in_schema=False)
    def atlas_root(name: str) -> Response:
        served(name)
        return Response(status_code=307, headers={"location": f"/atlas/{name}/"})

    @app.get("/atlas/{name}/", response_class=HTMLResponse, include_in_schema=False)
    def table_page(
        name: str,
        filter: str = Query("", max_length=1000),
        sort: str = "layer",
        order: str = Query("asc", pattern="^(asc|desc)$"),
        page: int = Query(1, ge=1, le=10**9),
        size: int = Query(50, ge=1, le=MAX_PAGE_SIZE),
    ) -> str:
        atlas = served(name)
        table = atlas.table()
        rows = table.page(filter, sort=sort, descending=order == "desc", page=page, size=size)
        query = {"filter": filter, "sort": sort, "order": order, "size": size, "page": page}
        return render_server_page(
            "serve_table.html.j2",
            atlas=atlas,
            table=rows,
            total_neurons=len(table),
            query=query,
            max_size=MAX_PAGE_SIZE,
            link=lambda **changes: _query_string({**query, **changes}),
        )

    @app.get("/atlas/{name}/neuron/{spec}", response_class=HTMLResponse, include_in_schema=False)
    def neuron_html(name: str, spec: str) -> str:
        atlas = served(name)
        layer, neuron = neuron_of(atlas, spec)
        page = dict(atlas.neuron_page(layer, neuron))
        page["links"] = _neighbours(atlas, layer, neuron)
        page["weights"] = atlas.neuron_weights(layer, neuron)
        page["weights_problem"] = atlas.weights_problem
        return render_neuron(page)

    # ---------------------------------------------------------------- JSON

    @app.get("/api/atlases")
    def api_atlases() -> list[dict[str, Any]]:
        """The served atlases."""
        return _atlases(catalog)

    @app.get("/api/atlas/{name}/neurons")
    def api_neurons(
        name: str,
        filter: str = Query("", max_length=1000, description="e.g. gate-_in- frequency > 0.2"),
        sort: str = "layer",
        order: str = Query("asc", pattern="^(asc|desc)$"),
        page: int = Query(1, ge=1, le=10**9),
        size: int = Query(50, ge=1, le=MAX_PAGE_SIZE),
    ) -> dict[str, Any]:
        """One page of the neuron table: columns, rows, and how many rows pass the filter."""
        table = served(name).table()
        rows = table.page(filter, sort=sort, descending=order == "desc", page=page, size=size)
        return _table_json(rows)

    @app.get("/api/atlas/{name}/neuron/{spec}")
    def api_neuron(name: str, spec: str) -> dict[str, Any]:
        """Everything a neuron's page shows (recomputed on first request, then cached)."""
        atlas = served(name)
        layer, neuron = neuron_of(atlas, spec)
        return atlas.neuron_page(layer, neuron)

    @app.get("/api/atlas/{name}/neuron/{spec}/weights")
    def api_neuron_weights(name: str, spec: str) -> dict[str, Any]:
        """A neuron's weight lens (top and bottom tokens of w_out, w_gate and w_in), its
        cosines and norms, and the related neurons of other layers."""
        atlas = served(name)
        layer, neuron = neuron_of(atlas, spec)
        weights = atlas.neuron_weights(layer, neuron)
        if weights is None:
            raise GatescopeError(f"no weight lens: {atlas.weights_problem}")
        return weights

    # ---------------------------------------------------------------- errors

    def answer(request: Request, status: int, message: str) -> Response:
        if request.url.path.startswith("/api/") or request.url.path in ("/docs", "/openapi.json"):
            return JSONResponse({"detail": message}, status_code=status)
        title = {404: "Not found", 400: "Cannot do that", 422: "Bad request"}.get(status, "Error")
        html = render_server_page(
            "serve_error.html.j2", status=status, title=title, message=message
        )
        return HTMLResponse(html, status_code=status)

    @app.exception_handler(GatescopeError)
    async def user_mistake(request: Request, error: GatescopeError) -> Response:
        return answer(request, 400, str(error))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> Response:
        message = error.detail if isinstance(error.detail, str) else "not found."
        if error.status_code == 404 and message == "Not Found":
            message = f"there is nothing at {request.url.path}."
        return answer(request, error.status_code, message)

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request: Request, error: RequestValidationError) -> Response:
        return answer(request, 422, _validation_sentence(error))

    return app


def _atlases(catalog: Catalog) -> list[dict[str, Any]]:
    return [
        {
            "name": a.name,
            "model": a.atlas.meta.model.name,
            "layers": a.atlas.num_layers,
            "d_mlp": a.atlas.d_mlp,
            "tokens": a.atlas.tokens,
            "distributions": a.atlas.has_distributions,
        }
        for a in catalog
    ]


def _table_json(rows: TablePage) -> dict[str, Any]:
    return {
        "columns": [{"key": c.key, "label": c.label} for c in rows.columns],
        "rows": rows.rows,
        "total": rows.total,
        "page": rows.page,
        "pages": rows.pages,
        "size": rows.size,
    }


def _neighbours(atlas: ServedAtlas, layer: int, neuron: int) -> dict[str, str | None]:
    """A neuron page's links (relative: the neighbours' pages are its siblings)."""
    layers, d = atlas.atlas.num_layers, atlas.atlas.d_mlp

    def link(lyr: int, n: int) -> str | None:
        return f"{lyr}.{n}" if 0 <= lyr < layers and 0 <= n < d else None

    return {
        "prev_neuron": link(layer, neuron - 1),
        "next_neuron": link(layer, neuron + 1),
        "prev_layer": link(layer - 1, neuron),
        "next_layer": link(layer + 1, neuron),
        "index": "../",
    }


def _query_string(query: dict[str, Any]) -> str:
    """The table's query, without the parameters at their defaults."""
    kept = {k: v for k, v in query.items() if _TABLE_DEFAULTS.get(k, 1) != v}
    return urllib.parse.urlencode(kept)


def _validation_sentence(error: RequestValidationError) -> str:
    """FastAPI's validation errors as one sentence naming each bad parameter."""
    parts = []
    for problem in error.errors():
        where = ".".join(str(p) for p in problem.get("loc", ())[1:]) or "the request"
        parts.append(f"{where}: {problem.get('msg', 'invalid')}")
    return "bad parameter: " + "; ".join(parts) + "."
