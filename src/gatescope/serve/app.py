"""The FastAPI application of ``gatescope serve``: HTML pages and the JSON API they show.

Routes (``NAME`` is an atlas's name in the catalog, ``L.N`` a neuron: ``L.E.N`` or ``L.N``
in a mixture of experts, :meth:`~gatescope.atlas.Atlas.find_neuron`):

* ``/``: the atlases; ``/atlas/NAME/``: the neuron table (filter, sort, pages);
  ``/atlas/NAME/neuron/L.N``: a neuron's page, recomputed on first request and cached;
  ``/atlas/NAME/layers?layer=L``: the model-wide views (frequencies per layer, and layer
  L's scatter of cos(w_in, w_out) against the frequency of x_gate > 0);
  ``/atlas/NAME/search?token=T&case=C``: the neurons whose top examples peak on a token;
  ``/atlas/NAME/probe``: any text through the model (a form, POSTed).
* ``/api/atlases``, ``/api/atlas/NAME/neurons``, ``/api/atlas/NAME/neuron/L.N``,
  ``/api/atlas/NAME/neuron/L.N/weights``, ``/api/atlas/NAME/frequencies``,
  ``/api/atlas/NAME/layer/L/correlation``, ``/api/atlas/NAME/search``, and POST
  ``/api/atlas/NAME/probe``: the same as JSON;
  ``/docs``: the API's documentation, a page made from its OpenAPI schema
  (``/openapi.json``) without FastAPI's Swagger UI, which loads its script from a CDN.

Every failure of a request is an answer with one sentence: a GatescopeError (a user's
mistake) is 400, a missing atlas or neuron 404, a malformed parameter 422; HTML under
``/atlas/``, JSON under ``/api/``. The server keeps serving.
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Form, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from gatescope import __version__
from gatescope.constants import CASES, QUANTITIES
from gatescope.errors import GatescopeError
from gatescope.records import finite
from gatescope.serve.probe import MAX_PROBE_CHARS, MAX_PROBE_TOKENS
from gatescope.serve.search import MAX_HITS
from gatescope.serve.table import MAX_PAGE_SIZE

if TYPE_CHECKING:
    from gatescope.serve.catalog import Catalog, ServedAtlas
    from gatescope.serve.probe import ProbeResult
    from gatescope.serve.table import TablePage

__all__ = ["create_app"]

JSON = "application/json"
_TABLE_DEFAULTS = {"filter": "", "sort": "layer", "order": "asc", "size": 50}


def create_app(catalog: Catalog) -> FastAPI:
    """The application serving ``catalog``'s atlases."""
    from gatescope.render import render_neuron, render_server_page

    app = FastAPI(title="gatescope", version=__version__, docs_url=None, redoc_url=None)

    def served(name: str) -> ServedAtlas:
        atlas = catalog.get(name)
        if atlas is None:
            raise HTTPException(404, f"there is no atlas '{name}' here.")
        return atlas

    def neuron_of(atlas: ServedAtlas, spec: str) -> tuple[int, int]:
        """(layer, index) of ``L.N`` (or ``L.E.N`` in a mixture of experts); 404 if the
        atlas has no such neuron."""
        try:
            return atlas.atlas.find_neuron(spec)
        except GatescopeError as error:
            raise HTTPException(404, str(error)) from None

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
            experts=atlas.atlas.meta.experts is not None,
            table=rows,
            total_neurons=len(table),
            query=query,
            max_size=MAX_PAGE_SIZE,
            link=lambda **changes: _query_string({**query, **changes}),
        )

    @app.get("/atlas/{name}/neuron/{spec}", response_class=HTMLResponse, include_in_schema=False)
    def neuron_html(name: str, spec: str, request: Request) -> HTMLResponse:
        atlas = served(name)
        layer, neuron = neuron_of(atlas, spec)

        def render() -> str:
            page = atlas.neuron_page(layer, neuron)
            page["links"] = _neighbours(atlas, layer, neuron)
            page["weights"] = atlas.neuron_weights(layer, neuron)
            page["weights_problem"] = atlas.weights_problem
            return render_neuron(page)

        gzipped = _accepts_gzip(request.headers.get("accept-encoding", ""))
        html = atlas.neuron_html(layer, neuron, render, gzipped=gzipped)
        headers = {"vary": "Accept-Encoding"}
        if gzipped:
            headers["content-encoding"] = "gzip"
        return HTMLResponse(html, headers=headers)

    @app.get("/atlas/{name}/layers", response_class=HTMLResponse, include_in_schema=False)
    def layers_page(name: str, layer: int | None = Query(None, ge=0, le=10**6)) -> str:
        atlas = served(name)
        chosen = atlas.atlas.num_layers // 2 if layer is None else layer
        if chosen >= atlas.atlas.num_layers:
            raise HTTPException(404, f"the atlas '{name}' has no layer {chosen}.")
        return render_server_page("serve_layers.html.j2", **_layer_views(atlas, chosen))

    @app.get("/atlas/{name}/search", response_class=HTMLResponse, include_in_schema=False)
    def search_page(
        name: str, token: str = Query("", max_length=200), case: str = Query("", max_length=20)
    ) -> str:
        atlas = served(name)
        result = atlas.search(token, case or None) if token else None
        return render_server_page(
            "serve_search.html.j2",
            atlas=atlas,
            query=token,
            case=case,
            cases=CASES,
            result=result,
            texts=dict(result.tokens) if result else {},
            max_hits=MAX_HITS,
        )

    @app.get("/atlas/{name}/probe", response_class=HTMLResponse, include_in_schema=False)
    def probe_form(
        name: str,
        layer: int = Query(0, ge=0, le=10**6),
        neuron: int = Query(0, ge=0, le=10**9),
    ) -> str:
        atlas = served(name)
        form = {"text": "", "layer": layer, "neuron": neuron, "position": None}
        return render_server_page("serve_probe.html.j2", **_probe_view(atlas, form, None))

    @app.post("/atlas/{name}/probe", response_class=HTMLResponse, include_in_schema=False)
    def probe_page(
        name: str,
        text: str = Form(max_length=MAX_PROBE_CHARS),
        layer: int = Form(ge=0, le=10**6),
        neuron: int = Form(ge=0, le=10**9),
        position: str = Form("", max_length=12),
    ) -> str:
        atlas = served(name)
        neuron_of(atlas, f"{layer}.{neuron}")
        at = _position(position)
        result = atlas.probe(text, layer, neuron, at)
        form = {"text": text, "layer": layer, "neuron": neuron, "position": at}
        return render_server_page("serve_probe.html.j2", **_probe_view(atlas, form, result))

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def api_docs() -> str:
        schema = app.openapi()
        return render_server_page("serve_docs.html.j2", schema=schema, routes=_routes(schema))

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

    @app.get("/api/atlas/{name}/neuron/{spec}", response_model=dict[str, Any])
    def api_neuron(name: str, spec: str) -> Response:
        """Everything a neuron's page shows (recomputed on first request, then cached)."""
        atlas = served(name)
        layer, neuron = neuron_of(atlas, spec)
        # Already plain JSON data: written straight, without FastAPI's validation walk.
        return Response(atlas.neuron_page_json(layer, neuron), media_type=JSON)

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

    @app.get("/api/atlas/{name}/frequencies")
    def api_frequencies(name: str) -> dict[str, Any]:
        """Per case and layer, the quantiles (at ``levels``) of the neurons' frequencies."""
        from gatescope.serve.views import FREQUENCY_LEVELS, layer_frequencies

        summaries = layer_frequencies(served(name).table())
        return {
            "levels": list(FREQUENCY_LEVELS),
            "cases": {case: values.tolist() for case, values in summaries.items()},
        }

    @app.get("/api/atlas/{name}/layer/{layer}/correlation")
    def api_correlation(name: str, layer: int = Path(ge=0, le=10**6)) -> dict[str, Any]:
        """cos(w_in, w_out) and the frequency of x_gate > 0 of every neuron of the layer,
        with Pearson's r and its p-value."""
        from gatescope.serve.views import gate_correlation

        atlas = served(name)
        if layer >= atlas.atlas.num_layers:
            raise HTTPException(404, f"the atlas '{name}' has no layer {layer}.")
        found = gate_correlation(atlas.table(), layer)
        return {
            "layer": layer,
            "neurons": found.neurons,
            "r": finite(found.r),
            "p": finite(found.p),
            "cos_in_out": [finite(x) for x in found.cos_in_out.tolist()],
            "gate_positive": [finite(x) for x in found.gate_positive.tolist()],
        }

    @app.get("/api/atlas/{name}/search")
    def api_search(
        name: str,
        token: str = Query(max_length=200, description="a token as it reads, or #ID"),
        case: str | None = Query(None, max_length=20, description="one sign case, or all"),
    ) -> dict[str, Any]:
        """The neurons whose top hook_post examples of a case peak on the token (most such
        examples first)."""
        result = served(name).search(token, case)
        return {
            "query": result.query,
            "case": result.case,
            "tokens": [{"token": t, "text": text} for t, text in result.tokens],
            "hits": [dataclasses.asdict(hit) for hit in result.hits],
        }

    @app.post("/api/atlas/{name}/probe")
    def api_probe(name: str, request: ProbeRequest) -> dict[str, Any]:
        """A text through the model up to ``layer``: the neuron's four quantities and sign
        case on every token, and at token ``position`` (default: the neuron's strongest)
        the layer's most active neurons per case. Texts beyond the model's context (at
        most 4,096 tokens) are cut to it (``truncated``, ``limit``)."""
        atlas = served(name)
        neuron_of(atlas, f"{request.layer}.{request.neuron}")
        found = atlas.probe(request.text, request.layer, request.neuron, request.position)
        return {
            "layer": found.layer,
            "neuron": found.neuron,
            "input_ids": list(found.input_ids),
            "tokens": list(found.tokens),
            "values": {
                q: [finite(v) for v in found.values[i].tolist()] for i, q in enumerate(QUANTITIES)
            },
            "cases": found.cases,
            "position": found.position,
            "top": {
                case: [{"neuron": t.neuron, "hook_post": finite(t.hook_post)} for t in top]
                for case, top in found.top.items()
            },
            "truncated": found.truncated,
            "given_tokens": found.given_tokens,
            "limit": found.limit,
        }

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


def _layer_views(atlas: ServedAtlas, layer: int) -> dict[str, Any]:
    """What the layers page shows: every layer's frequency boxes, and the scatter plot of
    ``layer`` (None, with the reason, when the weights cannot be read)."""
    from gatescope import charts
    from gatescope.serve.views import gate_correlation, layer_frequencies

    table = atlas.table()
    boxes = {case: charts.box_plot(s) for case, s in layer_frequencies(table).items()}
    layers = atlas.atlas.num_layers
    context: dict[str, Any] = {
        "atlas": atlas,
        "layers": layers,
        "d_mlp": atlas.atlas.d_mlp,
        "layer": layer,
        "frequency_boxes": boxes,
        "layer_tick_every": max(1, layers // 16),
        "width": charts.PLOT_WIDTH,
        "height": charts.PLOT_HEIGHT,
        "y_ticks": charts.axis_ticks(0.0, 1.0, 0.25, vertical=True),
        "x_ticks": charts.axis_ticks(-1.0, 1.0, 0.5, vertical=False),
        "correlation": None,
        "points": [],
        "problem": None,
    }
    try:
        found = gate_correlation(table, layer)
    except GatescopeError as error:
        context["problem"] = atlas.weights_problem or str(error)
        return context
    context["correlation"] = found
    context["points"] = charts.scatter(
        found.cos_in_out, found.gate_positive, layer, (-1.0, 1.0), (0.0, 1.0),
        "cos(w_in, w_out)", "P(x_gate > 0)",
    )  # fmt: skip
    return context


class ProbeRequest(BaseModel):
    """A probe: a text, a layer and a neuron, and optionally the token to list the layer's
    most active neurons at."""

    text: str = Field(max_length=MAX_PROBE_CHARS)
    layer: int = Field(ge=0, le=10**6)
    neuron: int = Field(ge=0, le=10**9)
    position: int | None = Field(None, ge=0, le=10**7)


def _accepts_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding header takes gzip (``gzip;q=0`` refuses it)."""
    for item in accept_encoding.lower().split(","):
        name, _, params = item.strip().partition(";")
        if name.strip() in ("gzip", "*"):
            return params.replace(" ", "") not in ("q=0", "q=0.0", "q=0.00", "q=0.000")
    return False


def _position(text: str) -> int | None:
    """The probe form's token field: empty for the neuron's strongest token."""
    if not text.strip():
        return None
    digits = text.strip()
    if not (digits.isascii() and digits.isdigit()):  # "²" is a digit, but no number
        raise GatescopeError(f"the token is a position in the text, not '{text}'.")
    return int(digits)


def _probe_view(
    atlas: ServedAtlas, form: dict[str, Any], result: ProbeResult | None
) -> dict[str, Any]:
    """What the probe page shows: the form, and a probe's result with the token data the
    neuron pages' script colors."""
    context: dict[str, Any] = {
        "atlas": atlas,
        "form": form,
        "result": result,
        "layers": atlas.atlas.num_layers,
        "d_mlp": atlas.atlas.d_mlp,
        "max_chars": MAX_PROBE_CHARS,
        "max_tokens": MAX_PROBE_TOKENS,
        "quantities": QUANTITIES,
    }
    if result is not None:
        values = [[finite(v) for v in row] for row in result.values.tolist()]
        context["data"] = {
            "quantities": list(QUANTITIES),
            "texts": {"probe": {"tokens": list(result.tokens), "values": values}},
            "before": 0,
            "after": 0,
        }
        cases = [c for c in result.cases if c is not None]
        context["case_counts"] = {case: cases.count(case) for case in CASES}
    return context


def _routes(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """The API's operations from its OpenAPI schema, for the docs page."""
    routes = []
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            parameters = [_parameter(p) for p in operation.get("parameters", [])]
            parameters += _body_fields(operation, schema)
            routes.append({
                "method": method.upper(),
                "path": path,
                "id": f"{method}-{path}".replace("/", "-").strip("-"),
                "description": " ".join(operation.get("description", "").split()),
                "parameters": parameters,
            })  # fmt: skip
    return routes


def _parameter(parameter: dict[str, Any]) -> dict[str, Any]:
    """A path or query parameter of an operation, for the docs page."""
    field = parameter.get("schema", {})
    return {
        "name": parameter["name"],
        "where": parameter.get("in", ""),
        "type": _type_name(field),
        "required": parameter.get("required", False),
        "description": parameter.get("description") or field.get("description", ""),
    }


def _body_fields(operation: dict[str, Any], schema: dict[str, Any]) -> list[dict[str, Any]]:
    """The fields of an operation's JSON body (its model in the schema's components)."""
    body = operation.get("requestBody", {}).get("content", {}).get(JSON, {})
    reference = body.get("schema", {}).get("$ref", "")
    model = schema.get("components", {}).get("schemas", {}).get(reference.split("/")[-1], {})
    required = model.get("required", [])
    return [
        {"name": name, "where": "JSON body", "type": _type_name(field),
         "required": name in required, "description": field.get("description", "")}
        for name, field in model.get("properties", {}).items()
    ]  # fmt: skip


def _type_name(field: dict[str, Any]) -> str:
    """A parameter's JSON type (``integer``, ``string or null``, ...)."""
    if "type" in field:
        return str(field["type"])
    return " or ".join(str(option.get("type", "?")) for option in field.get("anyOf", []))


def _table_json(rows: TablePage) -> dict[str, Any]:
    return {
        "columns": [{"key": c.key, "label": c.label} for c in rows.columns],
        "rows": rows.rows,
        "names": rows.names,
        "total": rows.total,
        "page": rows.page,
        "pages": rows.pages,
        "size": rows.size,
    }


def _neighbours(atlas: ServedAtlas, layer: int, neuron: int) -> dict[str, str | None]:
    """A neuron page's links (relative: the neighbours' pages are its siblings)."""

    def link(lyr: int, n: int) -> str | None:
        try:
            atlas.atlas.check_neuron(lyr, n)  # in range, and not a narrower layer's padding
        except GatescopeError:
            return None
        return atlas.atlas.neuron_name(lyr, n)

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
