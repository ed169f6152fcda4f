"""The shipped demo model, its data split, and `gatescope demo` end to end."""

from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner
from fastapi.testclient import TestClient
from safetensors import safe_open

from gatescope.atlas import Atlas
from gatescope.cli import cli
from gatescope.constants import CASES, SOURCE_ID
from gatescope.corpus import corpus_metadata, load_corpus
from gatescope.demo import model_path
from gatescope.demo.run import held_out_chunks
from gatescope.demo.stdlib import is_held_out, line_chunks, stdlib_texts
from gatescope.errors import GatescopeError
from gatescope.serve.app import create_app
from gatescope.serve.catalog import Catalog


@pytest.fixture(scope="module")
def demo_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path(), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_path())


def mean_loss(model, tokenizer, texts: list[str]) -> float:
    """Mean next-token loss (nats) over all tokens of the texts, BOS first, 256 at most."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, truncation=True, max_length=256, return_tensors="pt")
            logits = model(**ids).logits[0, :-1]  # [pos, vocab]
            targets = ids["input_ids"][0, 1:]
            total += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            count += len(targets)
    return total / count


def test_shipped_weights_are_small_float16_with_a_card():
    folder = model_path()
    weights = folder / "model.safetensors"
    assert weights.stat().st_size <= 8 * 2**20
    with safe_open(weights, "pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"F16"}  # noqa: SIM118
    card = (folder / "README.md").read_text()
    record = json.loads((folder / "training.json").read_text())
    assert f"{record['curve']['held_out'][-1]:.3f}" in card
    assert (folder / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_held_out_loss_is_far_below_a_random_models(demo_model):
    """On 41 chunks of held-out standard-library files: 2.54 nats per token, where a random
    model of the same shape has 8.36 (about ln(4096) = 8.32)."""
    from transformers import LlamaForCausalLM

    model, tokenizer = demo_model
    chunks = held_out_chunks()
    texts = [chunks[name] for name in sorted(chunks)[:: max(1, len(chunks) // 40)]]
    trained = mean_loss(model, tokenizer, texts)
    torch.manual_seed(0)
    untrained = mean_loss(LlamaForCausalLM(model.config).eval(), tokenizer, texts)
    assert untrained > 7.5
    assert trained < 3.0 and trained < untrained / 2.5, (trained, untrained)


def test_held_out_split_is_stable_and_a_tenth():
    assert not is_held_out("json/decoder.py")  # fixed forever by the hash of the path
    assert is_held_out("_py_abc.py")
    names = [f"pkg/module_{i}.py" for i in range(4000)]
    assert 0.08 < sum(map(is_held_out, names)) / len(names) < 0.12
    train, held_out = stdlib_texts("train"), stdlib_texts("held-out")
    assert held_out and train and not set(train) & set(held_out)
    assert all(is_held_out(name) for name in held_out)
    with pytest.raises(ValueError):
        stdlib_texts("test")


def test_line_chunks_keep_whole_lines_and_their_numbers():
    text = "".join(f"{'    ' * (i % 3)}line {i}\n" for i in range(1, 60)) + "x" * 90
    chunks = list(line_chunks(text, 80))
    assert "".join(chunk for _, _, chunk in chunks) == text
    lines = text.splitlines(keepends=True)
    for first, last, chunk in chunks:
        assert chunk == "".join(lines[first - 1 : last])
        assert len(chunk) <= 80 or first == last  # only a long line alone is longer
    assert chunks[-1] == (60, 60, "x" * 90)


def test_demo_end_to_end(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    runner = CliRunner()
    result = runner.invoke(
        cli, ["demo", "--out", str(out), "--no-serve", "--tokens", "12000", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    atlas = Atlas.load(out / "atlas")
    assert atlas.meta.corpus.tokens == 12_000  # BOS included; the atlas counts the rest
    pages = sorted((out / "site").glob("*-L*-N*.html"))
    assert len(pages) == 2 * atlas.num_layers
    index = (out / "site" / "index.html").read_text()
    assert all(f'href="{page.name}"' in index for page in pages)
    assert index.count("most frequent gate-_in-") == index.count("strongest hook_post") == 4
    # Per layer: the most frequent gate-_in- neuron, with its frequency, is on the list.
    negative = CASES.index("gate-_in-")
    for layer in range(atlas.num_layers):
        neuron = int(atlas.tensor("count")[layer, negative].argmax())
        freq = atlas.neuron(layer, neuron).freq["gate-_in-"]
        assert f"{layer}.{neuron} " in result.output
        assert f"most frequent gate-_in- ({freq:.1%} of tokens)" in result.output
    # Source ids point into the standard library: path and lines.
    assert corpus_metadata(out / "corpus").recipe.source == "held-out Python standard library"
    source_ids = load_corpus(out / "corpus")[SOURCE_ID]
    assert all(re.fullmatch(r"[\w/.-]+\.py:\d+-\d+", s) for s in source_ids)
    # A rerun replaces the demo, and serves it (gatescope serve, stubbed here: it would run
    # until Ctrl-C), printing where the picked neurons are.
    served = {}

    def fake_serve(atlases, *, port, on_ready):
        served.update(atlases=atlases, port=port)
        on_ready("http://127.0.0.1:8123/")

    monkeypatch.setattr("gatescope.serve.serve", fake_serve)
    again = runner.invoke(cli, ["demo", "--out", str(out), "--tokens", "6000", "--quiet",
                                "--port", "0"])  # fmt: skip
    assert again.exit_code == 0, again.output
    assert served == {"atlases": [out / "atlas"], "port": 0}
    assert Atlas.load(out / "atlas").meta.corpus.tokens == 6000
    assert not (out / "site").exists()  # no static pages when serving
    links = re.findall(r"http://127\.0\.0\.1:8123/atlas/atlas/neuron/(\d+)\.(\d+)", again.output)
    assert len(links) == 2 * atlas.num_layers
    client = TestClient(create_app(Catalog.open([out / "atlas"])))
    layer, neuron = map(int, links[0])
    page = client.get(f"/atlas/atlas/neuron/{layer}.{neuron}")
    assert page.status_code == 200 and f"Neuron {layer}.{neuron}" in page.text
    # A folder holding anything else is refused.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    refused = runner.invoke(cli, ["demo", "--out", str(tmp_path / "mine"), "--no-serve"])
    assert refused.exit_code == 1 and "holds no earlier demo" in refused.output
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    bad_port = runner.invoke(cli, ["demo", "--out", str(out), "--port", "99999"])
    assert bad_port.exit_code == 2 and "99999" in bad_port.output  # refused before any work


def test_a_taken_port_is_refused_in_a_sentence_before_any_work(tmp_path):
    from gatescope.serve import listen

    with listen("127.0.0.1", 0) as taken:
        port = str(taken.getsockname()[1])
        taken.listen()
        demo = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "demo"), "--port", port])
        assert demo.exit_code == 1 and "pass --port with a free port" in demo.output
        assert not (tmp_path / "demo").exists()
        with pytest.raises(GatescopeError, match=r"cannot serve on 127\.0\.0\.1"):
            listen("127.0.0.1", int(port))
