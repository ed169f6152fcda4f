"""Neuron pages: the values they show, what they leave out, untrusted text, the site index."""

from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

import datasets
import pytest
import torch
from click.testing import CliRunner

import gatescope
from gatescope.cli import cli
from gatescope.constants import CASES
from gatescope.corpus import TokenizedCorpus
from gatescope.errors import GatescopeError
from gatescope.pages import PageSource, page_file, top_neurons, write_pages

ATTACKS = ["<script>alert(1)</script>", '"><img src=x onerror=alert(1)>', "{{ 7*7 }}"]


def page_data(path: Path) -> dict:
    text = path.read_text()
    match = re.search(r'<script type="application/json" id="page-data">(.*?)</script>', text, re.S)
    return json.loads(match[1])


def shown_examples(path: Path) -> list[tuple[int, int, float]]:
    """(text, position, value) of every example on a page, as the HTML carries them."""
    text = path.read_text()
    found = re.findall(r'data-text="(\d+)" data-position="(\d+)" data-value="([^"]+)"', text)
    return [(int(t), int(p), float(v)) for t, p, v in found]


@pytest.fixture(scope="module")
def fixture_site(stories260k, tinystories, tmp_path_factory):
    """Pages of the real model: two neurons of one layer, one of another."""
    from gatescope.corpus import build_corpus, save_corpus

    root = tmp_path_factory.mktemp("site")
    corpus = build_corpus(tinystories, stories260k, max_length=128, tokens=8_000, seed=2)
    save_corpus(corpus, root / "corpus")
    atlas = gatescope.scan(stories260k, root / "corpus", out=root / "atlas", k=8, progress=False)
    source = PageSource.open(atlas)
    pages = write_pages(source, [(3, 5), (3, 6), (1, 0)], root / "site")
    return atlas, source, pages, root


def test_every_example_carries_the_atlas_value(fixture_site):
    atlas, _, pages, _ = fixture_site
    for path, (layer, neuron) in zip(pages, [(3, 5), (3, 6), (1, 0)], strict=True):
        summary = atlas.neuron(layer, neuron)
        expected = [
            (e.text, e.position, e.value)
            for case in CASES
            for examples in summary.top[case].values()
            for e in examples
        ]
        assert sorted(shown_examples(path)) == sorted(expected)
        data = page_data(path)
        for text, position, value in expected:
            quantity_values = data["texts"][str(text)]["values"]
            # The recomputed per-token values (kept to 4 digits) agree with the atlas.
            assert any(
                abs(row[position] - value) <= 1e-3 * abs(value) + 1e-6 for row in quantity_values
            )


def test_page_header_summary_and_links(fixture_site):
    atlas, _, pages, _ = fixture_site
    text = pages[0].read_text()
    assert "Neuron 3.5" in text and "stories260K" in text
    assert f"{atlas.tokens:,} tokens" in text
    assert 'href="stories260K-L3-N6.html"' in text  # the next neuron exists
    assert "← neuron</span>" in text  # the previous one does not
    summary = atlas.neuron(3, 5)
    assert f"{summary.freq['gate-_in-'] * 100:.2f}%" in text


def test_a_case_that_never_occurs_is_left_out(stories260k, fixture_site, tmp_path):
    atlas, source, _, _ = fixture_site
    # The atlas with neuron 3.5's gate-_in- case erased, as if it never occurred.
    names = gatescope.atlas.TENSORS + gatescope.atlas.DISTRIBUTIONS
    tensors = {name: atlas.tensor(name).clone() for name in names}
    case = CASES.index("gate-_in-")
    tensors["histogram"][3, 5, case] = 0
    tensors["joint"][3, 5, case] = 0
    tensors["typical_text"][3, 5, case] = -1
    tensors["count"][3, case, 5] = 0
    tensors["max"][3, case, :, 5] = float("nan")
    tensors["min"][3, case, :, 5] = float("nan")
    lists = [i for i, (c, _) in enumerate(gatescope.constants.TOP_LISTS) if c == case]
    tensors["top_text"][3, 5, lists] = -1
    edited = gatescope.Atlas(atlas.meta, tensors)
    source = PageSource(edited, source.loaded, source.corpus, source.tokenizer)
    (path,) = write_pages(source, [(3, 5)], tmp_path)
    text = path.read_text()
    assert "<b>gate-_in-</b>" not in text  # no section
    assert '<tr class="never">' in text  # the summary row says it never occurs
    row = text.split('<tr class="never">')[1].split("</tr>")[0]
    assert "0.00%" in row and row.count("—") == 24  # dashes, not zeros (quantiles too)
    assert '<figure class="histogram never">' in text  # an empty histogram, greyed


def test_rerun_adds_pages_and_keeps_the_old_ones(fixture_site):
    _, source, _, root = fixture_site
    site = root / "site"
    older = site / "stories260K-L3-N5.html"
    before = older.read_text()
    write_pages(source, [(4, 1), (3, 4)], site)
    listed = json.loads((site / "site.json").read_text())["pages"]
    assert {(p["layer"], p["neuron"]) for p in listed} == {(3, 5), (3, 6), (1, 0), (4, 1), (3, 4)}
    index = (site / "index.html").read_text()
    for p in listed:
        assert (site / p["file"]).exists() and f'href="{p["file"]}"' in index
    # The older page beside a new one links to it now; nothing else of it changed.
    after = older.read_text()
    assert "← neuron</span>" in before and 'href="stories260K-L3-N4.html"' in after
    nav = re.compile(r'<nav id="neighbours">.*?</nav>', re.S)
    assert nav.sub("", after) == nav.sub("", before)


def test_top_neurons(fixture_site):
    atlas = fixture_site[0]
    strongest = top_neurons(atlas, 2, 3)
    peaks = (atlas.tensor("max")[2, :, 3].nan_to_num(-1e9)).amax(dim=0)
    peaks = torch.maximum(peaks, (-atlas.tensor("min")[2, :, 3]).nan_to_num(-1e9).amax(dim=0))
    assert strongest == peaks.argsort(descending=True)[:3].tolist()
    by_case = top_neurons(atlas, 2, 2, by="gate-_in-")
    counts = atlas.tensor("count")[2, CASES.index("gate-_in-")]
    assert counts[by_case[0]] == counts.max()
    with pytest.raises(GatescopeError, match="cannot rank by"):
        top_neurons(atlas, 2, 2, by="loudest")


# ------------------------------------------------------------------ untrusted text


def hostile_atlas(root: Path):
    """An atlas in ``root`` of a tiny model with a character tokenizer over texts that are
    attacks (their source ids too)."""
    from gatescope.corpus import save_corpus
    from gatescope.records import CorpusRecipe
    from tests.models import tiny_model
    from tests.tokenizers import char_tokenizer

    tokenizer = char_tokenizer()
    tokenizer.save_pretrained(root / "model")
    model = tiny_model("llama", dtype=torch.float32, vocab=len(tokenizer))
    model.save_pretrained(root / "model")
    texts = [f"story {i}: {attack} and more" for i, attack in enumerate(ATTACKS * 3)]
    ids = [tokenizer(t)["input_ids"] for t in texts]
    corpus = datasets.Dataset.from_dict(
        {"input_ids": ids, "source_id": [f"web:{a}" for a in ATTACKS * 3]}
    )
    save_corpus(corpus, root / "corpus", recipe=CorpusRecipe(tokenizer=str(root / "model")))
    return gatescope.scan(root / "model", root / "corpus", out=root / "atlas", k=4, progress=False)


@pytest.fixture(scope="module")
def hostile_site(tmp_path_factory):
    """A site whose corpus texts are attacks."""
    root = tmp_path_factory.mktemp("hostile")
    pages = write_pages(PageSource.open(hostile_atlas(root)), [(0, 0), (1, 3)], root / "site")
    return pages, root


def test_values_stop_after_the_last_window_but_every_token_is_shown(hostile_site):
    from gatescope.pages import CONTEXT_AFTER

    pages, root = hostile_site
    corpus = TokenizedCorpus.open(root / "corpus")
    data = page_data(pages[0])
    last: dict[int, int] = {}  # of the top and the typical examples
    for text, position in re.findall(
        r'data-text="(\d+)" data-position="(\d+)"', pages[0].read_text()
    ):
        last[int(text)] = max(last.get(int(text), 0), int(position))
    assert set(last) == {int(t) for t in data["texts"]}
    cut = 0
    for key, text in data["texts"].items():
        length = int(corpus.lengths[int(key)])
        assert len(text["tokens"]) == length  # the whole text, to read
        computed = len(text["values"][0])
        assert computed == min(length, last[int(key)] + CONTEXT_AFTER + 1)
        cut += computed < length
    assert cut  # some texts had tokens after their last window


def test_hostile_text_is_escaped_in_the_html(hostile_site):
    pages, _ = hostile_site
    text = pages[0].read_text()
    assert "<script>alert" not in text and "<img" not in text
    assert "49" not in re.findall(r"story \d+: (\S+)", text)  # {{ 7*7 }} was not evaluated
    assert html.escape("web:<script>alert(1)</script>") in text  # the source id, escaped
    data = page_data(pages[0])
    joined = ["".join(t["tokens"]) for t in data["texts"].values()]
    assert any("<script>alert(1)</script>" in t for t in joined)


def _chromium():
    selenium = pytest.importorskip("selenium")
    del selenium
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("chromium and chromium-driver are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def test_no_script_runs_in_a_browser(hostile_site):
    from selenium.common.exceptions import NoAlertPresentException

    pages, root = hostile_site
    browser = _chromium()
    try:
        for page in [*pages, root / "site" / "index.html"]:
            browser.get(page.as_uri())
            with pytest.raises(NoAlertPresentException):
                browser.switch_to.alert.text  # noqa: B018 - an alert would mean a script ran
            assert browser.find_elements("css selector", "img") == []
        browser.get(pages[0].as_uri())
        shown = browser.find_element("css selector", "body").text
        # The windows show the attacks as literal text (spaces drawn as dots).
        assert "<script>alert(1)</script>" in shown.replace("·", " ")
        assert "{{·7*7·}}" in shown or "{{ 7*7 }}" in shown
        tokens = browser.find_elements("css selector", ".tok")
        assert tokens and "case:" in tokens[0].get_attribute("title")
        # Switching the quantity recolors the tokens.
        before = tokens[0].value_of_css_property("background-color")
        browser.find_element("css selector", "input[name=quantity][value='1']").click()
        after = browser.find_element("css selector", ".tok").value_of_css_property(
            "background-color"
        )
        assert before != after
    finally:
        browser.quit()


def test_cli_page(hostile_site, tmp_path):
    _, root = hostile_site
    runner = CliRunner()
    result = runner.invoke(
        cli, ["page", str(root / "atlas"), "--neurons", "1.2", "1.1", "--layer", "0", "--top", "2",
              "--out", str(tmp_path / "site")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "wrote 4 page(s)" in result.output
    assert (tmp_path / "site" / page_file(str(root / "model"), 1, 2)).exists()
    bad = runner.invoke(cli, ["page", str(root / "atlas"), "-n", "1:2", "--out", str(tmp_path)])
    assert bad.exit_code == 1 and "LAYER.NEURON" in bad.output and "Traceback" not in bad.output
    bad = runner.invoke(cli, ["page", str(root / "atlas"), "-n", "9.0", "--out", str(tmp_path)])
    assert bad.exit_code == 1 and "out of range" in bad.output
    bad = runner.invoke(cli, ["page", str(root / "atlas"), "--out", str(tmp_path)])
    assert bad.exit_code == 1 and "name the neurons" in bad.output
