"""HTML of neuron pages and of a site's index (Jinja2 templates shipped in the package).

Every page is one self-contained file: the stylesheet and script are inlined, no CDN.
Autoescaping is on for everything, and the page's data travels as JSON through Jinja's
``tojson`` (which escapes ``<``, ``>``, ``&`` and quotes): corpus texts are untrusted.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import jinja2

    from gatescope.records import SiteMeta

__all__ = ["refresh_nav", "render_index", "render_nav", "render_neuron", "render_server_page"]


@cache
def _environment() -> jinja2.Environment:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("gatescope", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["number"] = _number
    env.filters["visible"] = _visible
    env.globals["zip"] = zip
    # A page carries hundreds of thousands of values: orjson writes them (compact, keys
    # sorted, NaN as null) in milliseconds; tojson still escapes the result for HTML.
    env.policies["json.dumps_function"] = _compact_json
    return env


@cache
def _asset(name: str) -> str:
    return (
        resources.files("gatescope")
        .joinpath("templates")
        .joinpath(name)
        .read_text(encoding="utf-8")
    )


def render_neuron(page: dict[str, Any]) -> str:
    """The HTML of one neuron page (see :func:`gatescope.pages.neuron_page`)."""
    from markupsafe import Markup

    template = _environment().get_template("neuron.html.j2")
    return template.render(
        page=page, css=Markup(_asset("page.css")), script=Markup(_asset("neuron.js"))
    )


def render_index(site: SiteMeta) -> str:
    """The HTML of a site's index: a model / layer / neuron picker over its pages."""
    from markupsafe import Markup

    template = _environment().get_template("index.html.j2")
    return template.render(
        site=site, css=Markup(_asset("page.css")), script=Markup(_asset("index.js"))
    )


def render_server_page(template: str, **context: Any) -> str:
    """The HTML of one of the server's own pages (``serve_*.html.j2``); ``script`` is the
    neuron pages' token renderer, for pages that show tokens."""
    from markupsafe import Markup

    page = _environment().get_template(template)
    return page.render(
        css=Markup(_asset("page.css")), script=Markup(_asset("neuron.js")), **context
    )


def render_nav(links: dict[str, str | None]) -> str:
    """The links of a neuron page to its neighbour pages (see ``nav.html.j2``)."""
    return _environment().get_template("nav.html.j2").render(links=links).strip()


# The nav element holds file names and fixed labels only, never corpus text, so its first
# closing tag is its own.
_NAV = re.compile(r'<nav id="neighbours">.*?</nav>', re.DOTALL)


def refresh_nav(page: Path, links: dict[str, str | None]) -> None:
    """Rewrites the neighbour links of an existing page in place (the rest is unchanged)."""
    html = page.read_text(encoding="utf-8")
    updated = _NAV.sub(lambda _: render_nav(links), html, count=1)
    if updated != html:
        page.write_text(updated, encoding="utf-8")


def _compact_json(value: Any, **_: Any) -> str:
    import orjson

    options = orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
    return orjson.dumps(value, option=options).decode()


def _visible(token: str) -> str:
    """A token with its whitespace drawn, as the pages' script draws it: a space as a dot,
    a tab as an arrow, a newline as a return sign (a lone token's leading space matters)."""
    return token.replace(" ", "·").replace("\t", "→").replace("\n", "↵").replace("\r", "␍")


def _number(x: float | None) -> str:
    """Four significant digits; an em dash for a value that does not exist."""
    if x is None:
        return "—"
    return f"{x:.4g}"
