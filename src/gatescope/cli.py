"""The ``gatescope`` command. Heavy libraries load inside each command: ``--help`` is instant."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from gatescope.errors import GatescopeError
from gatescope.options import DEVICE_MAPS, DTYPES, STATS_BACKENDS, ScanOptions

F = TypeVar("F", bound=Callable[..., Any])


class _Command(click.Command):
    """A command: the libraries' own progress bars are off while it runs, unless ``-v``."""

    def invoke(self, ctx: click.Context) -> Any:
        if ctx.find_root().params.get("verbose"):
            return super().invoke(ctx)
        from gatescope.progress import library_bars_off

        with library_bars_off():
            return super().invoke(ctx)


class _Group(click.Group):
    """Turns a user's mistake (GatescopeError) into one sentence and exit code 1."""

    command_class: type[click.Command] | None = _Command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except GatescopeError as error:
            raise click.ClickException(str(error)) from None
        except MemoryError:
            raise click.ClickException(
                "out of memory: lower --batch-size (or use a machine with more memory)."
            ) from None
        except Exception as error:
            if type(error).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
                raise click.ClickException(
                    "the GPU ran out of memory: lower --batch-size."
                ) from None
            raise


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gatescope")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """gatescope: a neuron atlas for gated-MLP (SwiGLU, GEGLU) language models.

    \b
    Typical use:
      gatescope corpus texts/ --tokenizer MODEL --out corpus/
      gatescope scan --model MODEL --corpus corpus/ --out atlas/
      gatescope export atlas/ atlas-dataset/
      gatescope page atlas/ --neurons 3.141 --out site/
      gatescope serve atlas/

    First time? `gatescope demo` runs it all on a small model shipped in the package.
    """
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(
        level=max(level, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s"
    )


def _scan_option(name: str, **kwargs: Any) -> Callable[[F], F]:
    """``--name`` for a field of ScanOptions, with its default and help text."""
    default = ScanOptions.default(name)
    flag = "--" + name.replace("_", "-")
    if isinstance(default, bool):  # a flag that is on by default is turned off by --no-NAME
        flags = f"{flag}/--no-{flag[2:]}" if default else flag
        return click.option(flags, is_flag=True, default=default, help=ScanOptions.help(name))
    return click.option(
        flag, default=default, show_default=default is not None, help=ScanOptions.help(name),
        **kwargs,
    )  # fmt: skip


@cli.command()
@click.argument("source")
@click.option("--tokenizer", required=True, help="Tokenizer: hub id or local folder (the model's).")
@click.option(
    "--out", required=True, type=click.Path(path_type=Path), help="Corpus folder to write."
)
@click.option(
    "--max-length",
    default=1024,
    show_default=True,
    type=click.IntRange(min=2),
    help="Truncate each text to this many tokens (BOS included).",
)
@click.option(
    "--tokens",
    type=click.IntRange(min=1),
    default=None,
    help="Token budget: stop once this many tokens are taken. [default: all texts]",
)
@click.option("--seed", default=0, show_default=True, help="Shuffle seed.")
@click.option(
    "--text-column",
    default="text",
    show_default=True,
    help="Column holding the text (.jsonl, .parquet, datasets).",
)
@click.option("--split", default="train", show_default=True, help="Split of a hub dataset.")
@click.option(
    "--separator",
    default="<|endoftext|>",
    show_default=True,
    help="Separator between texts inside a .txt file.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing corpus folder.")
def corpus(
    source, tokenizer, out, max_length, tokens, seed, text_column, split, separator, overwrite
) -> None:
    """Tokenize SOURCE into a corpus folder for `gatescope scan`.

    SOURCE is a .jsonl, .parquet or .txt file, a folder of them, a folder written by
    `datasets`, or a Hugging Face dataset name. Each text starts with BOS (EOS when the
    tokenizer has none), texts are shuffled with --seed, and the same inputs always give the
    same corpus.
    """
    from gatescope.corpus import build_corpus, corpus_metadata, save_corpus
    from gatescope.files import CORPUS, claim_output

    claim_output(out, CORPUS, overwrite=overwrite)  # before any work

    dataset = build_corpus(
        source,
        tokenizer,
        max_length=max_length,
        tokens=tokens,
        seed=seed,
        text_column=text_column,
        split=split,
        separator=separator,
        progress=True,
    )
    saved = corpus_metadata(save_corpus(dataset, out, overwrite=overwrite))
    assert saved is not None
    click.echo(f"wrote {saved.num_texts:,} texts, {saved.num_tokens:,} tokens to {out}")


@cli.command()
@click.option("--model", required=True, help="Hugging Face model id or local model folder.")
@click.option(
    "--corpus",
    "corpus_path",
    required=True,
    type=click.Path(path_type=Path),
    help="Corpus folder written by `gatescope corpus`.",
)
@click.option(
    "--out", required=True, type=click.Path(path_type=Path), help="Atlas folder to write."
)
@_scan_option("batch_size", type=click.IntRange(min=1))
@_scan_option("k", type=click.IntRange(min=1))
@_scan_option("dtype", type=click.Choice(DTYPES))
@_scan_option("device")
@_scan_option("device_map", type=click.Choice(DEVICE_MAPS))
@_scan_option("include_bos")
@_scan_option("refactor_glu")
@_scan_option("distributions")
@_scan_option("seed", type=click.IntRange(min=0, max=2**32 - 1))
@_scan_option("stats_backend", type=click.Choice(STATS_BACKENDS))
@click.option("--resume", is_flag=True, help="Continue the unfinished scan in --out.")
@click.option("--overwrite", is_flag=True, help="Replace the atlas or unfinished scan in --out.")
@_scan_option("checkpoint_every", type=click.FloatRange(min=0))
@click.option(
    "--shard",
    default=None,
    metavar="i/N",
    help="Scan only part i of N of the corpus (0-based); combine parts with `gatescope merge`.",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def scan(
    model,
    corpus_path,
    out,
    batch_size,
    k,
    dtype,
    device,
    device_map,
    include_bos,
    refactor_glu,
    distributions,
    seed,
    stats_backend,
    resume,
    overwrite,
    checkpoint_every,
    shard,
    quiet,
) -> None:
    """Scan a corpus with a model and write the atlas of all its gated-MLP neurons.

    For every neuron: how often each sign case of (gate, in) occurs, the mean of the four
    quantities per case, the top-k texts per case and quantity, and (unless
    --no-distributions) per case the histograms of the quantities, the joint (gate, in)
    histogram and k typical examples drawn at random. Checkpoints go into
    --out every few minutes and on Ctrl-C or SIGTERM (a preemption); --resume continues
    from the last one.

    Under `torchrun --nproc-per-node G -m gatescope scan ...` each rank scans its part of
    the corpus and rank 0 writes the merged atlas.
    """
    from gatescope.scanner import scan as run_scan

    options = ScanOptions(
        batch_size=batch_size,
        k=k,
        dtype=dtype,
        device=device,
        device_map=device_map,
        include_bos=include_bos,
        refactor_glu=refactor_glu,
        distributions=distributions,
        seed=seed,
        stats_backend=stats_backend,
        checkpoint_every=checkpoint_every,
    )
    atlas = run_scan(model, corpus_path, options, out=out, resume=resume, overwrite=overwrite,
                     progress=not quiet, shard=shard)  # fmt: skip
    if int(os.environ.get("RANK", "0")) != 0:
        return  # rank 0 speaks for all
    part = f" (shard {shard})" if shard else ""
    click.echo(
        f"wrote {atlas.num_layers} layers x {atlas.d_mlp} neurons over "
        f"{atlas.tokens:,} tokens to {out}{part}"
    )


@cli.command()
@click.argument("parts", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Atlas to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing atlas at --out.")
def merge(parts, out, overwrite) -> None:
    """Merge atlases of parts of one corpus (`gatescope scan --shard i/N`) into one.

    All N parts give the atlas of a single scan; fewer give a larger part, to merge again.
    """
    from gatescope.atlas import Atlas
    from gatescope.files import ATLAS, claim_output
    from gatescope.merge import merge_atlases

    claim_output(out, ATLAS, overwrite=overwrite)  # before any work
    atlas = merge_atlases([Atlas.load(p) for p in parts], [str(p) for p in parts])
    atlas.save(out, overwrite=overwrite)
    left = atlas.meta.shards
    state = f"parts {list(left.parts)} of {left.count}" if left else "complete"
    click.echo(f"merged {len(parts)} parts into {out} ({state}, {atlas.tokens:,} tokens)")


@cli.command()
@click.argument("atlas_path", metavar="ATLAS", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--format",
    "fmt",
    default="hf",
    show_default=True,
    type=click.Choice(["hf", "parquet", "gluscope"]),
    help="hf: a `datasets` folder (save_to_disk); parquet: one file; gluscope: GLUScope's "
    "exact schema (a save_to_disk folder its own code reads).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT.")
def export(atlas_path, out, fmt, overwrite) -> None:
    """Export ATLAS as the GLUScope activation dataset (one row per neuron) to OUT.

    hf and parquet hold our superset (positions, extremes, the atlas's metadata); gluscope
    holds exactly GLUScope's columns, dtypes and padding.
    """
    from gatescope.atlas import Atlas
    from gatescope.export import export_atlas
    from gatescope.gluscope import first_token_warning

    atlas = Atlas.load(atlas_path)
    warning = first_token_warning(atlas) if fmt == "gluscope" else None
    if warning:
        click.echo(f"note: {warning}", err=True)
    path = export_atlas(atlas, out, format=fmt, overwrite=overwrite)
    click.echo(f"wrote {path}")


@cli.command("import")
@click.argument("source")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--model", default=None, help="Model the dataset describes (recorded in the atlas).")
@click.option(
    "--corpus",
    "corpus_path",
    default=None,
    type=click.Path(path_type=Path),
    help="The corpus its text indices point into (`gatescope corpus` on GLUScope's tokenized "
    "corpus): pages use it, and it gives the token count.",
)
@click.option(
    "--refactor-glu",
    is_flag=True,
    help="The statistics were made with refactored weights (GLUScope's --refactor_glu, as "
    "its published OLMo-7B data).",
)
@click.option(
    "--tokens",
    type=click.IntRange(min=1),
    default=None,
    help="Tokens of its corpus, if known and no --corpus is given.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT.")
def import_(source, out, model, corpus_path, refactor_glu, tokens, overwrite) -> None:
    """Import a dataset in the GLUScope schema (SOURCE: folder, .parquet or hub id) or a
    GLUScope summary.pt as an atlas.

    GLUScope's conventions are kept: the first token counted, zero-padded lists read as
    empty slots, no positions (pages find them), no token count unless --corpus or --tokens.
    """
    from gatescope.export import import_dataset

    atlas = import_dataset(source, out, model=model, tokens=tokens, corpus=corpus_path,
                           refactor_glu=refactor_glu, overwrite=overwrite)  # fmt: skip
    click.echo(f"wrote {atlas.num_layers} layers x {atlas.d_mlp} neurons to {out}")


@cli.command()
@click.argument("atlas_path", metavar="ATLAS", type=click.Path(path_type=Path))
# `--neurons 31.9634 5.10602`: click options take one value, so the further ones arrive as
# arguments.
@click.argument("more_neurons", nargs=-1, metavar="")
@click.option(
    "--neurons",
    "-n",
    multiple=True,
    metavar="L.N ...",
    help="Neurons as LAYER.NEURON, e.g. --neurons 31.9634 5.10602; in a mixture of experts "
    "also LAYER.EXPERT.NEURON (EXPERT a number, shared or dense), e.g. 3.5.17.",
)
@click.option("--layer", type=int, default=None, help="With --top: the layer to pick from.")
@click.option("--top", type=click.IntRange(min=1), default=None, help="Pick the N top neurons.")
@click.option(
    "--by",
    default="strongest",
    show_default=True,
    help="Rank for --top: strongest (largest |hook_post|) or a case (its frequency).",
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Site folder.")
@click.option("--model", default=None, help="Model folder or id, if not where the atlas says.")
@click.option("--corpus", "corpus_path", default=None, help="Corpus folder, likewise.")
def page(atlas_path, more_neurons, neurons, layer, top, by, out, model, corpus_path) -> None:
    """Write neuron pages of ATLAS (one HTML file each, plus index.html) into --out.

    Re-running adds pages to the site and keeps the earlier ones.
    """
    from gatescope.atlas import Atlas
    from gatescope.files import SITE, claim_output
    from gatescope.pages import PageSource, check_ranking, top_neurons, write_pages

    # Every input is checked before the model loads.
    if (layer is None) != (top is None):
        raise GatescopeError("--layer and --top go together: e.g. --layer 3 --top 10.")
    check_ranking(by)
    atlas = Atlas.load(atlas_path)
    chosen = [atlas.find_neuron(spec) for spec in (*neurons, *more_neurons)]
    if top is not None:
        chosen += [(layer, n) for n in top_neurons(atlas, layer, top, by)]
    if not chosen:
        raise GatescopeError("name the neurons: --neurons 31.9634 ... or --layer L --top N.")
    claim_output(out, SITE, resume=True)
    source = PageSource.open(atlas, model=model, corpus=corpus_path)
    written = write_pages(source, chosen, out)
    click.echo(f"wrote {len(written)} page(s) and {out / 'index.html'}")


def _port_option(help: str) -> Callable[[F], F]:
    """``--port``, 8000 by default."""
    return click.option(
        "--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help=help
    )


@cli.command()
@click.argument(
    "atlases", nargs=-1, required=True, metavar="ATLAS...", type=click.Path(path_type=Path)
)
@click.option("--model", default=None, help="Model folder or id, if not where the atlases say.")
@click.option("--corpus", "corpus_path", default=None, help="Corpus folder, likewise.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@_port_option("Port to listen on (0: any free).")
def serve(atlases, model, corpus_path, host, port) -> None:
    """Serve ATLAS... as a live site: every neuron's page on demand, the neuron table, and
    a JSON API (/docs). The model loads on the first page that needs it."""
    from gatescope.serve import serve as run_server

    run_server(
        atlases, model=model, corpus=corpus_path, host=host, port=port,
        on_ready=lambda url: click.echo(f"serving on {url} (Ctrl-C to stop)"),
    )  # fmt: skip


@cli.command()
@click.option(
    "--out",
    default="gatescope-demo",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Folder for the demo's corpus, atlas and pages (a rerun replaces them).",
)
@click.option(
    "--no-serve", is_flag=True, help="Write static pages of the picked neurons instead of serving."
)
@_port_option("Loopback port to serve on (0: any free).")
@click.option(
    "--tokens",
    type=click.IntRange(min=1),
    default=None,
    help="Tokens of held-out code to scan [default: 250,000].",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(out, no_serve, port, tokens, quiet) -> None:
    """Scan held-out Python standard-library code with the small model shipped in the
    package, and serve the atlas on 127.0.0.1 (gatescope serve), pointing at neurons worth
    a look; --no-serve writes their static pages instead.

    Offline, about a minute on two CPU cores.
    """
    from gatescope.demo.run import DEMO_TOKENS, run_demo
    from gatescope.serve import listen

    if not no_serve:
        listen("127.0.0.1", port).close()  # a taken port is refused before any work
    result = run_demo(out, tokens=tokens or DEMO_TOKENS, site=no_serve, progress=not quiet)
    click.echo(f"scanned {result.tokens:,} tokens of held-out standard-library code")
    if no_serve:
        click.echo("pages:")
        for page in result.pages:
            click.echo(f"  {page.layer}.{page.neuron:<5} {page.why:<44} {page.path}")
        click.echo(f"index: {result.index}")
        return
    from gatescope.serve import serve as run_server

    def ready(url: str) -> None:
        click.echo("neurons worth a look:")
        for page in result.pages:
            where = f"{url}atlas/atlas/neuron/{page.layer}.{page.neuron}"
            click.echo(f"  {page.layer}.{page.neuron:<5} {page.why:<44} {where}")
        click.echo(f"serving the atlas on {url}atlas/atlas/ (Ctrl-C to stop)")

    run_server([result.atlas], port=port, on_ready=ready)


def main() -> None:
    cli(prog_name="gatescope")
