"""The weights module against the loaded model it reads from disk: every family's tensors,
the final norm's scale, the cosines, the weight lens and the related neurons, each checked
against a float64 brute force over the model's own parameters."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from gatescope.arch import find_gated_mlps, refactor_glu
from gatescope.errors import GatescopeError
from gatescope.weights import LENS_TOKENS, ModelWeights, related_neurons, weight_lens
from tests.models import FAMILIES, VARIANTS, tiny_model

#: The final norm's per-dimension scale, by what each family's norm computes.
_NORM_SCALE = {
    "gemma": lambda w: 1 + w,
    "gemma2": lambda w: 1 + w,
    "gemma3": lambda w: 1 + w,
}


def saved_model(folder, family: str, *, dtype=torch.float32, seed: int = 0):
    """A tiny model of ``family`` with a random final norm, saved to ``folder``."""
    model = tiny_model(family, dtype=dtype, seed=seed, num_layers=3)
    norm = model.model.norm
    if getattr(norm, "weight", None) is not None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=generator) + 0.5)
    model.save_pretrained(folder)
    return model


def expected_scale(family: str, model) -> torch.Tensor:
    weight = getattr(model.model.norm, "weight", None)
    if weight is None:  # OLMo's final norm has no parameters
        return torch.ones(model.config.hidden_size, dtype=torch.float64)
    return _NORM_SCALE.get(family, lambda w: w)(weight.detach().double())


@pytest.mark.parametrize("family", FAMILIES + VARIANTS)
def test_every_familys_weights_are_read_as_the_model_has_them(family, tmp_path):
    model = saved_model(tmp_path, family)
    weights = ModelWeights.open(tmp_path)
    mlps = find_gated_mlps(model)
    assert weights.num_layers == len(mlps) and weights.d_mlp == mlps[0].d_mlp
    for layer, mlp in enumerate(mlps):
        read = weights.layer(layer)
        assert torch.equal(read.w_gate, mlp.w_gate().float())
        assert torch.equal(read.w_in, mlp.w_in().float())
        assert torch.equal(read.w_out, mlp.w_out().float())
    assert torch.equal(weights.embedding, model.get_input_embeddings().weight.detach())
    assert torch.equal(weights.unembedding, model.get_output_embeddings().weight.detach())
    assert weights.final_scale is not None
    torch.testing.assert_close(
        weights.final_scale.double(), expected_scale(family, model), rtol=1e-6, atol=1e-6
    )


def test_refactored_weights_are_the_models_after_refactor_glu(tmp_path):
    model = saved_model(tmp_path, "llama")
    weights = ModelWeights.open(tmp_path, refactor_glu=True)
    assert refactor_glu(find_gated_mlps(model)) > 0
    for layer, mlp in enumerate(find_gated_mlps(model)):
        read = weights.layer(layer)
        assert torch.equal(read.w_in, mlp.w_in()) and torch.equal(read.w_out, mlp.w_out())
        assert (F.cosine_similarity(read.w_gate, read.w_in, dim=1) >= 0).all()


def test_the_figures_are_the_cosines_and_norms_of_the_weights(tmp_path):
    model = saved_model(tmp_path, "phi3", dtype=torch.bfloat16)  # fused gate_up, bf16 on disk
    figures = ModelWeights.open(tmp_path).figures()
    for layer, mlp in enumerate(find_gated_mlps(model)):
        g, u, o = mlp.w_gate().double(), mlp.w_in().double(), mlp.w_out().double().T
        expected = {
            "cos_gate_in": F.cosine_similarity(g, u, dim=1),
            "cos_gate_out": F.cosine_similarity(g, o, dim=1),
            "cos_in_out": F.cosine_similarity(u, o, dim=1),
            "norm_gate": g.norm(dim=1),
            "norm_in": u.norm(dim=1),
            "norm_out": o.norm(dim=1),
        }
        for name, values in expected.items():
            got = torch.from_numpy(getattr(figures, name)[layer]).double()
            torch.testing.assert_close(got, values, rtol=1e-5, atol=1e-6, msg=name)


def test_the_figures_survive_a_round_trip_on_disk(tmp_path):
    saved_model(tmp_path / "model", "qwen2")
    figures = ModelWeights.open(tmp_path / "model").figures()
    figures.save(tmp_path / "figures.safetensors")
    again = type(figures).load(tmp_path / "figures.safetensors")
    assert again is not None and (again.cos_in_out == figures.cos_in_out).all()
    assert type(figures).load(tmp_path / "absent.safetensors") is None


def test_the_weight_lens_ranks_tokens_like_a_brute_force(tmp_path):
    model = saved_model(tmp_path, "gemma")  # tied embeddings, a (1 + w) final norm
    weights = ModelWeights.open(tmp_path)
    figures = weights.figures()
    mlp = find_gated_mlps(model)[1]
    embedding = model.get_input_embeddings().weight.detach().double()
    unembedding = model.get_output_embeddings().weight.detach().double()
    scale = expected_scale("gemma", model)
    neuron = 5
    vectors = {
        ("w_out", "unembedding"): (unembedding, mlp.w_out()[:, neuron].double() * scale),
        ("w_gate", "unembedding"): (unembedding, mlp.w_gate()[neuron].double()),
        ("w_gate", "embedding"): (embedding, mlp.w_gate()[neuron].double()),
        ("w_in", "unembedding"): (unembedding, mlp.w_in()[neuron].double()),
        ("w_in", "embedding"): (embedding, mlp.w_in()[neuron].double()),
    }
    lens = weight_lens(weights, figures, 1, neuron)
    assert lens.final_norm and lens.cos_in_out == pytest.approx(figures.cos_in_out[1, neuron])
    assert [(p.vector, p.through) for p in lens.projections] == list(vectors)
    for projection in lens.projections:
        matrix, vector = vectors[projection.vector, projection.through]
        scores = matrix @ vector
        order = torch.argsort(scores, descending=True)
        assert [t for t, _ in projection.top] == order[:LENS_TOKENS].tolist()
        assert [t for t, _ in projection.bottom] == order.flip(0)[:LENS_TOKENS].tolist()
        got = [s for _, s in projection.top]
        assert got == pytest.approx(scores[order[:LENS_TOKENS]].tolist(), rel=1e-5)


def test_related_neurons_are_the_strongest_cosines_of_other_layers(tmp_path):
    model = saved_model(tmp_path, "llama")
    weights = ModelWeights.open(tmp_path)
    mlps = find_gated_mlps(model)
    layer, neuron, k = 1, 7, 6
    related = related_neurons(weights, weights.figures(), layer, neuron, k=k)

    def brute(pairs):
        """The k largest |cos| over (layer, neuron, a, b) candidates."""
        scored = [(abs(c), lyr, n, c) for lyr, n, c in pairs]
        scored.sort(key=lambda s: (-s[0], s[1], s[2]))
        return [(lyr, n) for _, lyr, n, _ in scored[:k]], [c for *_, c in scored[:k]]

    def cosines(read_of, vector, layers):
        for other in layers:
            matrix = read_of(mlps[other]).double()
            cos = F.cosine_similarity(matrix, vector.double()[None], dim=1)
            yield from ((other, n, float(c)) for n, c in enumerate(cos))

    later, earlier = range(layer + 1, len(mlps)), range(layer)
    own = mlps[layer]
    expected = {
        "reads_out_via_gate": brute(cosines(lambda m: m.w_gate(), own.w_out()[:, neuron], later)),
        "reads_out_via_in": brute(cosines(lambda m: m.w_in(), own.w_out()[:, neuron], later)),
        "writes_gate": brute(cosines(lambda m: m.w_out().T, own.w_gate()[neuron], earlier)),
        "writes_in": brute(cosines(lambda m: m.w_out().T, own.w_in()[neuron], earlier)),
    }
    for path, (neurons, cos) in expected.items():
        got = getattr(related, path)
        assert [(r.layer, r.neuron) for r in got] == neurons, path
        assert [r.cos for r in got] == pytest.approx(cos, rel=1e-4, abs=1e-6), path
    first = related_neurons(weights, weights.figures(), 0, 0)
    last = related_neurons(weights, weights.figures(), len(mlps) - 1, 0)
    assert first.writes_gate == () and last.reads_out_via_in == ()
    assert all(r.layer > 0 for r in first.reads_out_via_gate)


def without_config(folder):
    saved_model(folder, "llama")
    (folder / "config.json").unlink()
    return folder


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda tmp: "nobody/no-such-model", "not on this machine"),
        (lambda tmp: tmp, "has no safetensors weights"),
        (without_config, "could not read the model config"),
    ],
)
def test_weights_that_cannot_be_read_are_refused_in_a_sentence(make, says, tmp_path):
    with pytest.raises(GatescopeError, match=says):
        ModelWeights.open(make(tmp_path))


def test_the_fixture_models_lens(stories260k):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stories260k)
    weights = ModelWeights.open(stories260k)
    figures = weights.figures()
    assert figures.shape == (5, 172)
    mlps = find_gated_mlps(model)
    for layer, neuron in itertools.product(range(5), (0, 171)):
        expected = F.cosine_similarity(
            mlps[layer].w_gate()[neuron].double(), mlps[layer].w_out()[:, neuron].double(), dim=0
        )
        assert figures.cos_gate_out[layer, neuron] == pytest.approx(float(expected), abs=1e-6)
    torch.testing.assert_close(weights.final_scale, model.model.norm.weight.detach())
    lens = weight_lens(weights, figures, 4, 10)
    logits = model.lm_head.weight.detach() @ (mlps[4].w_out()[:, 10] * model.model.norm.weight)
    assert lens.projections[0].top[0][0] == int(logits.argmax())
