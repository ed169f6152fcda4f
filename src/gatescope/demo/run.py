"""`gatescope demo`: the shipped model scanned on the held-out standard library.

Two steps, each with a progress bar: a corpus of the held-out files cut into chunks of
whole lines, and a scan of it. Then two neurons of every layer are picked: the one whose
`gate-_in-` case is most frequent (the case older viewers never show) and the one with the
strongest `hook_post`; the CLI serves the atlas live (`gatescope serve`) pointing at them,
or writes their static pages (a third step).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gatescope import __version__
from gatescope.atlas import Atlas
from gatescope.demo import model_path
from gatescope.demo.stdlib import line_chunks, stdlib_texts
from gatescope.errors import GatescopeError
from gatescope.files import DEMO, claim_output, remove_path, write_json_atomic
from gatescope.progress import library_bars_off

__all__ = ["DEMO_TOKENS", "Demo", "DemoPage", "held_out_chunks", "pick_neurons", "run_demo"]

#: Tokens of held-out code scanned by default: enough for full top-16 lists of every
#: neuron, small enough that the demo takes about a minute on two CPU cores.
DEMO_TOKENS = 250_000
#: The model's context, and so the corpus's longest text.
CONTEXT = 256
# Chunks of whole lines of at most this many characters: about 230 tokens of the demo
# tokenizer (3.4 characters a token on the standard library), so few are cut short.
CHUNK_CHARS = 780
MARKER = DEMO.markers[0]


@dataclass
class DemoPage:
    layer: int
    neuron: int
    why: str  # what singles it out, for the reader
    path: Path | None  # its static page, when written


@dataclass
class Demo:
    out: Path
    tokens: int
    pages: list[DemoPage]

    @property
    def atlas(self) -> Path:
        return self.out / "atlas"

    @property
    def index(self) -> Path:
        """The static site's index (written with ``site=True``)."""
        return self.out / "site" / "index.html"


def held_out_chunks() -> dict[str, str]:
    """The held-out standard-library files in chunks: ``"path:first-last"`` (1-based lines)
    -> text. Chunks keep their indentation: it is part of what a code model reads."""
    return {
        f"{path}:{first}-{last}": chunk
        for path, text in stdlib_texts("held-out").items()
        for first, last, chunk in line_chunks(text, CHUNK_CHARS)
    }


def pick_neurons(atlas: Atlas) -> list[tuple[int, int, str]]:
    """Per layer: the neuron with the most frequent ``gate-_in-`` case and the one with the
    strongest ``hook_post`` (another one when both are the same): (layer, neuron, why)."""
    from gatescope.pages import top_neurons

    picked: list[tuple[int, int, str]] = []
    for layer in range(atlas.num_layers):
        (negative,) = top_neurons(atlas, layer, 1, by="gate-_in-")
        freq = atlas.neuron(layer, negative).freq["gate-_in-"]
        picked.append((layer, negative, f"most frequent gate-_in- ({freq:.1%} of tokens)"))
        strong = next(n for n in top_neurons(atlas, layer, 2) if n != negative)
        peak = float(atlas.layer(layer).strongest("hook_post")[strong])
        picked.append((layer, strong, f"strongest hook_post (|{peak:.3g}|)"))
    return picked


def run_demo(
    out: str | Path, *, tokens: int = DEMO_TOKENS, site: bool = True, progress: bool = True
) -> Demo:
    """Builds the corpus, scans it and picks the neurons, in ``out`` (a folder of its own:
    a rerun replaces an earlier demo there, any other non-empty folder is refused); with
    ``site``, writes their static pages too."""
    out = _claim(Path(out), tokens)
    with library_bars_off():
        return _run(out, tokens, site, progress)


def _run(out: Path, tokens: int, site: bool, progress: bool) -> Demo:
    from gatescope.corpus import build_corpus, save_corpus
    from gatescope.pages import PageSource, write_pages
    from gatescope.scanner import scan

    model = model_path()
    chunks = held_out_chunks()
    if not chunks:
        raise GatescopeError("this Python has no held-out standard-library files to scan.")
    corpus = build_corpus(
        chunks, model, max_length=CONTEXT, tokens=tokens, seed=0, progress=progress,
        source_name="held-out Python standard library",
    )  # fmt: skip
    save_corpus(corpus, out / "corpus", overwrite=True)
    atlas = scan(model, out / "corpus", out=out / "atlas", overwrite=True, progress=progress)
    picked = pick_neurons(atlas)
    remove_path(out / "site")  # pages of an earlier demo's atlas
    paths: list[Path | None] = [None] * len(picked)
    if site:
        paths = list(write_pages(
            PageSource.open(atlas), [(layer, n) for layer, n, _ in picked], out / "site",
            notes={(layer, n): why for layer, n, why in picked}, progress=progress,
        ))  # fmt: skip
    pages = [DemoPage(layer, n, why, p) for (layer, n, why), p in zip(picked, paths, strict=True)]
    assert atlas.tokens is not None  # a scan always knows its token count
    return Demo(out, atlas.tokens, pages)


def _claim(out: Path, tokens: int) -> Path:
    """Makes ``out`` the demo's folder: an earlier demo there is replaced, a folder holding
    anything else refused."""
    claim_output(out, DEMO, overwrite=True)
    out.mkdir(parents=True, exist_ok=True)
    marker = {"format": "gatescope-demo", "gatescope": __version__, "tokens": tokens}
    write_json_atomic(out / MARKER, marker)
    return out
