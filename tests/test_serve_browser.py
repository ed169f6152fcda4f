"""gatescope serve in a real browser: a `gatescope serve` process on loopback, driven by
headless Debian Chromium through Selenium. Open the table, filter it, open a neuron, switch
the quantity, open the weight lens, run a probe, search a token, see the layers, and find
the expected numbers on screen. Screenshots are kept in ``$GATESCOPE_ARTIFACTS`` (CI keeps
them in ``.ci-artifacts/``), else in the test's temporary folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gatescope.serve.table import NeuronTable
from gatescope.weights import ModelWeights, weight_lens
from tests.test_pages import _chromium, hostile_atlas

ATTACK = "once <script>alert(1)</script> upon <img src=x onerror=alert(2)> a time"


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A `gatescope serve` process on a port of its own choosing: (url, atlas, root)."""
    root = tmp_path_factory.mktemp("live")
    atlas = hostile_atlas(root)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "gatescope", "serve", str(root / "atlas"), "--port", "0"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env)  # fmt: skip
    url = _wait_for_url(server, timeout=180)
    try:
        yield url, atlas, root
    finally:
        server.terminate()
        server.wait(timeout=30)


def _wait_for_url(server: subprocess.Popen, timeout: float) -> str:
    found: list[str] = []
    lines: list[str] = []

    def read() -> None:
        assert server.stdout is not None
        for line in server.stdout:
            lines.append(line)
            match = re.search(r"serving on (http://\S+/)", line)
            if match:
                found.append(match[1])
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if not found:
        server.kill()
        raise AssertionError("gatescope serve did not start: " + "".join(lines))
    return found[0]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("GATESCOPE_ARTIFACTS") or tmp_path_factory.mktemp("shots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_a_researchers_tour_of_the_live_atlas(live, artifacts):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    url, atlas, root = live
    browser = _chromium()
    browser.set_window_size(1300, 1600)

    def no_alert() -> None:
        with pytest.raises(NoAlertPresentException):
            browser.switch_to.alert.text  # noqa: B018 - an alert would mean a script ran

    def shot(name: str) -> None:
        browser.save_screenshot(str(artifacts / f"serve-{name}.png"))

    try:
        # The table, filtered: the count on screen is the brute force's.
        browser.get(f"{url}atlas/atlas/")
        query = "gate-_in- frequency > 0.2 and layer = 1"
        box = browser.find_element(By.NAME, "filter")
        box.clear()
        box.send_keys(query)
        box.submit()
        _wait(
            lambda: (
                "shown by the filter" in browser.page_source and "filter=" in browser.current_url
            )
        )
        expected = NeuronTable(atlas).page(query, size=500).total
        meta = browser.find_element(By.CSS_SELECTOR, "header .meta").text
        assert f"{expected:,} shown by the filter" in meta
        rows = browser.find_elements(By.CSS_SELECTOR, "table.neurons tbody tr")
        assert rows and all(r.find_element(By.TAG_NAME, "td").text == "1" for r in rows)
        shot("table")

        # A neuron: its page, the quantity switch, the weight lens with its numbers.
        link = rows[0].find_element(By.CSS_SELECTOR, "th a")
        layer, neuron = map(int, link.get_attribute("title").split()[-1].split("."))
        link.click()
        _wait(lambda: f"Neuron {layer}.{neuron}" in browser.title)
        no_alert()
        token = browser.find_element(By.CSS_SELECTOR, ".tok")
        assert "case:" in token.get_attribute("title")
        before = token.value_of_css_property("background-color")
        browser.find_element(By.CSS_SELECTOR, "input[name=quantity][value='0']").click()
        after = browser.find_element(By.CSS_SELECTOR, ".tok").value_of_css_property(
            "background-color"
        )
        assert before != after
        weights = ModelWeights.open(root / "model")
        lens = weight_lens(weights, weights.figures(), layer, neuron)
        figures = browser.find_element(By.ID, "weight-figures").text.split()
        assert figures[0] == f"{lens.cos_gate_in:.4g}" and figures[2] == f"{lens.cos_in_out:.4g}"
        browser.find_element(By.CSS_SELECTOR, "#weight-lens summary").click()
        first_table = browser.find_element(By.CSS_SELECTOR, "table.lens")
        assert first_table.is_displayed()
        top_score = first_table.find_elements(By.CSS_SELECTOR, "tr td")[1].text
        assert top_score == f"{lens.projections[0].top[0][1]:.4g}"
        browser.execute_script("document.querySelector('section.weights').scrollIntoView()")
        shot("neuron")

        # The probe: hostile text stays text; the neuron's strongest token is outlined.
        browser.find_element(By.PARTIAL_LINK_TEXT, "probe this neuron").click()
        _wait(lambda: "Probe" in browser.title)
        browser.find_element(By.NAME, "text").send_keys(ATTACK)
        browser.find_element(By.CSS_SELECTOR, "form.probe button").click()
        _wait(lambda: browser.find_elements(By.ID, "probe-tokens"))
        no_alert()
        assert browser.find_elements(By.TAG_NAME, "img") == []
        shown = browser.find_element(By.ID, "probe-tokens").text.replace("·", " ")
        assert "<script>alert(1)</script>" in shown
        strongest = browser.find_element(By.CSS_SELECTOR, "#probe-tokens .tok.max")
        catalog_probe = _probe(root, ATTACK, layer, neuron)
        value = float(re.search(r"act\(g\)·u = (\S+)", strongest.get_attribute("title"))[1])
        assert value == pytest.approx(float(catalog_probe.values[3, catalog_probe.position]))
        top_links = browser.find_elements(By.CSS_SELECTOR, "#probe-top a")
        assert top_links and all(a.text.startswith(f"{layer}.") for a in top_links)
        shot("probe")

        # Search by token, and the layers page.
        browser.get(f"{url}atlas/atlas/search?token=a")
        assert browser.find_elements(By.CSS_SELECTOR, "#search-results tbody tr")
        shot("search")
        browser.get(f"{url}atlas/atlas/layers?layer=1")
        points = browser.find_elements(By.CSS_SELECTOR, "circle.point")
        assert len(points) == atlas.d_mlp
        assert "Pearson r =" in browser.find_element(By.ID, "pearson").text
        shot("layers")
    finally:
        browser.quit()


def _probe(root: Path, text: str, layer: int, neuron: int):
    from gatescope.serve.catalog import Catalog

    return Catalog.open([root / "atlas"]).get("atlas").probe(text, layer, neuron)


def _wait(condition, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError("the page did not show what was expected in time")
