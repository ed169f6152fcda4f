"""Tests of gatescope.arch: finding gated MLPs, weight views, hooks and the GLU refactoring."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import pytest
import torch
from torch import nn

from gatescope.arch import (
    GatedMLP,
    find_gated_mlps,
    refactor_glu,
    refactored_glu,
    unembedding,
)
from gatescope.errors import GatescopeError
from gatescope.experts import find_routed_experts
from tests.models import (
    FAMILIES,
    MOE_FAMILIES,
    NON_GATED,
    VARIANTS,
    tiny_model,
    tiny_moe_model,
    tiny_non_gated,
)

ALL = FAMILIES + VARIANTS
NUM_LAYERS, HIDDEN, D_MLP, VOCAB = 2, 32, 64, 128


def _ids(seed: int = 0, batch: int = 3, length: int = 12, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _record(mlps: list[GatedMLP]) -> tuple[dict, dict, dict, list]:
    """Hook each MLP's input and output and capture() its gate/up; returns the lists filled."""
    inputs: dict[int, list] = {m.layer: [] for m in mlps}
    outputs: dict[int, list] = {m.layer: [] for m in mlps}
    captured: dict[int, list] = {m.layer: [] for m in mlps}
    handles = []
    for m in mlps:
        handles.append(
            m.module.register_forward_pre_hook(lambda _, args, i=m.layer: inputs[i].append(args[0]))
        )
        handles.append(
            m.module.register_forward_hook(lambda _, __, out, i=m.layer: outputs[i].append(out))
        )
        handles.append(m.capture(lambda g, u, i=m.layer: captured[i].append((g, u))))
    return inputs, outputs, captured, handles


def _cosines(mlp: GatedMLP) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(mlp.w_gate(), mlp.w_in(), dim=1)


def _assert_capture_consistent(model: nn.Module, ids: torch.Tensor, atol: float) -> None:
    """capture() gives x @ w_gate.T (+b) and x @ w_in.T (+b); the MLP output is their GLU."""
    mlps = find_gated_mlps(model)
    inputs, outputs, captured, handles = _record(mlps)
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    for m in mlps:
        assert len(captured[m.layer]) == 1 == len(inputs[m.layer])
        (gate, up), x, out = captured[m.layer][0], inputs[m.layer][0], outputs[m.layer][0]
        assert gate.shape == up.shape == (*ids.shape, m.d_mlp)
        b_gate, b_in, b_out = m.b_gate(), m.b_in(), m.down_proj.bias
        expect_gate = x @ m.w_gate().T + (0 if b_gate is None else b_gate)
        expect_up = x @ m.w_in().T + (0 if b_in is None else b_in)
        torch.testing.assert_close(gate, expect_gate, atol=atol, rtol=0)
        torch.testing.assert_close(up, expect_up, atol=atol, rtol=0)
        expect_out = (m.act_fn(gate) * up) @ m.w_out().T + (0 if b_out is None else b_out)
        torch.testing.assert_close(out, expect_out, atol=atol, rtol=0)


@pytest.mark.parametrize("family", ALL)
def test_find_gated_mlps(family: str) -> None:
    model = tiny_model(family)
    mlps = find_gated_mlps(model)
    assert [m.layer for m in mlps] == list(range(NUM_LAYERS))
    assert [m.name for m in mlps] == [f"model.layers.{i}.mlp" for i in range(NUM_LAYERS)]
    modules = dict(model.named_modules())
    for m in mlps:
        assert m.module is modules[m.name]
        assert (m.d_mlp, m.d_model) == (D_MLP, HIDDEN)
        assert m.w_gate().shape == m.w_in().shape == (D_MLP, HIDDEN)
        assert m.w_out().shape == (HIDDEN, D_MLP)
        assert m.fused == (family == "phi3")
        # The model's own activation module, not a re-implementation.
        own = getattr(m.module, "act_fn", None) or m.module.activation_fn
        assert m.act_fn is own
        # Views of the parameters, not copies.
        for view, param in [(m.w_gate(), m.gate_proj or m.gate_up_proj), (m.w_out(), m.down_proj)]:
            assert view.untyped_storage().data_ptr() == param.weight.untyped_storage().data_ptr()
        has_bias = family == "llama_bias"
        assert (m.b_gate() is not None) == (m.b_in() is not None) == has_bias
        if has_bias:
            assert m.b_gate().shape == m.b_in().shape == (D_MLP,)


def test_gemma_uses_gelu_tanh() -> None:
    mlp = find_gated_mlps(tiny_model("gemma"))[0]
    x = torch.linspace(-3, 3, 13)
    torch.testing.assert_close(mlp.act_fn(x), nn.functional.gelu(x, approximate="tanh"))


def test_phi3_fused_halves() -> None:
    mlp = find_gated_mlps(tiny_model("phi3"))[0]
    weight = mlp.gate_up_proj.weight
    assert torch.equal(mlp.w_gate(), weight[:D_MLP]) and torch.equal(mlp.w_in(), weight[D_MLP:])
    row = weight.element_size() * HIDDEN
    assert mlp.w_in().data_ptr() == weight.data_ptr() + D_MLP * row


@pytest.mark.parametrize("family", ALL)
def test_capture_matches_weights(family: str) -> None:
    _assert_capture_consistent(tiny_model(family, dtype=torch.float64), _ids(), atol=1e-10)


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_capture_passes_the_model_tensors_and_removes(family: str) -> None:
    model = tiny_model(family)
    mlp = find_gated_mlps(model)[1]
    projection = mlp.gate_up_proj or mlp.gate_proj
    seen, calls = [], []
    own = projection.register_forward_hook(lambda _, __, out: seen.append(out))
    handle = mlp.capture(lambda g, u: calls.append((g, u)))
    with torch.no_grad():
        model(_ids())
        model(_ids(1))
    assert len(calls) == 2
    for (gate, _up), out in zip(calls, seen, strict=True):
        # The same memory the model computed: the tensor itself, or a chunk view of it.
        assert gate.data_ptr() == out.data_ptr()
        if family == "llama":
            assert gate is out
    handle.remove()
    handle.remove()  # harmless
    own.remove()
    with torch.no_grad():
        model(_ids())
    assert len(calls) == 2
    assert not projection._forward_hooks
    assert not mlp.module._forward_pre_hooks


class _UpFirstMLP(nn.Module):
    """A gated MLP that runs up_proj before gate_proj, to test the hook order independence."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(4, 6, bias=False)
        self.up_proj = nn.Linear(4, 6, bias=False)
        self.down_proj = nn.Linear(6, 4, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.up_proj(x)
        return self.down_proj(self.act_fn(self.gate_proj(x)) * up)


def test_capture_any_projection_order() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(_UpFirstMLP(), _UpFirstMLP())
    mlps = find_gated_mlps(model)
    assert [m.name for m in mlps] == ["0", "1"]
    calls = []
    with mlps[0].capture(lambda g, u: calls.append((g, u))):
        x = torch.randn(5, 4)
        model(x)
    (gate, up), block = calls[0], model[0]
    torch.testing.assert_close(gate, block.gate_proj(x))
    torch.testing.assert_close(up, block.up_proj(x))
    assert len(calls) == 1


def test_capture_recovers_after_a_failed_forward() -> None:
    mlp_module = _UpFirstMLP()
    mlp = find_gated_mlps(nn.ModuleList([mlp_module]))[0]
    calls = []
    mlp.capture(lambda g, u: calls.append((g, u)))
    mlp_module.up_proj(torch.randn(2, 4))  # an up without its gate, as if a forward had failed
    x = torch.randn(3, 4)
    mlp_module(x)
    assert len(calls) == 1 and calls[0][1].shape == (3, 6)
    torch.testing.assert_close(calls[0][1], mlp_module.up_proj(x))


@pytest.mark.parametrize("family", ALL)
def test_capture_with_act_passes_the_models_own_activation(family: str) -> None:
    model = tiny_model(family)
    mlps = find_gated_mlps(model)
    calls: dict[int, list] = {m.layer: [] for m in mlps}
    computed: dict[int, list] = {m.layer: [] for m in mlps}
    handles = []
    for m in mlps:
        assert isinstance(m.act_fn, nn.Module)  # every family's activation is a module
        handles.append(m.act_fn.register_forward_hook(
            lambda _, __, out, i=m.layer: computed[i].append(out)))  # fmt: skip
        handles.append(m.capture_with_act(lambda g, u, a, i=m.layer: calls[i].append((g, u, a))))
    with torch.no_grad():
        model(_ids())
    for handle in handles:
        handle.remove()
    for m in mlps:
        ((gate, _up, act),) = calls[m.layer]
        assert act is computed[m.layer][-1]  # the model's tensor itself
        assert torch.equal(act, m.act_fn(gate))


class _ActOutOfSight(_UpFirstMLP):
    """Activates the gate where no hook on act_fn sees it: functionally, or on a copy."""

    def __init__(self, on_copy: bool) -> None:
        super().__init__()
        self.on_copy = on_copy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)
        act = self.act_fn(gate.clone()) if self.on_copy else nn.functional.silu(gate)
        return self.down_proj(act * self.up_proj(x))


@pytest.mark.parametrize("on_copy", [False, True])
def test_capture_with_act_without_the_activation_still_calls(on_copy: bool) -> None:
    block = _ActOutOfSight(on_copy)
    mlp = find_gated_mlps(nn.ModuleList([block]))[0]
    calls = []
    with mlp.capture_with_act(lambda g, u, a: calls.append((g, u, a))):
        x = torch.randn(3, 4)
        block(x)
        block(x)
    assert len(calls) == 2
    gate, up, act = calls[0]
    assert act is None
    torch.testing.assert_close(gate, block.gate_proj(x))
    torch.testing.assert_close(up, block.up_proj(x))


class _TwoPairsOutOfSight(_UpFirstMLP):
    """Projects two halves of its input one after the other, activating them functionally."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        halves = [nn.functional.silu(self.gate_proj(h)) * self.up_proj(h) for h in x.chunk(2)]
        return self.down_proj(torch.cat(halves))


def test_capture_with_act_calls_back_once_per_pair_it_never_saw_activated() -> None:
    block = _TwoPairsOutOfSight()
    mlp = find_gated_mlps(nn.ModuleList([block]))[0]
    calls = []
    x = torch.randn(4, 4)
    with mlp.capture_with_act(lambda g, u, a: calls.append((g, u, a))):
        block(x)
    assert len(calls) == 2
    for (gate, up, act), half in zip(calls, x.chunk(2), strict=True):
        assert act is None
        torch.testing.assert_close(gate, block.gate_proj(half))
        torch.testing.assert_close(up, block.up_proj(half))


def test_activation_found_as_child() -> None:
    class Mlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_proj, self.up_proj = nn.Linear(4, 6), nn.Linear(4, 6)
            self.down_proj, self.nonlinearity = nn.Linear(6, 4), nn.GELU()

    (mlp,) = find_gated_mlps(nn.ModuleList([Mlp()]))
    assert isinstance(mlp.act_fn, nn.GELU)


@pytest.mark.parametrize(
    ("family", "cls", "layout"),
    [
        ("gpt2", "GPT2MLP", "c_fc -> act -> c_proj"),
        ("gpt_neox", "GPTNeoXMLP", "dense_h_to_4h -> act -> dense_4h_to_h"),
    ],
)
def test_non_gated_models_raise(family: str, cls: str, layout: str) -> None:
    assert family in NON_GATED
    with pytest.raises(GatescopeError, match=cls) as info:
        find_gated_mlps(tiny_non_gated(family))
    message = str(info.value)
    assert message.startswith(f"{family} has no gated MLP: its 2 layers use {cls} ({layout})")
    assert "gate_proj" in message and "\n" not in message


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_mixture_of_experts_models_are_found_and_refused_in_one_sentence(family: str) -> None:
    """Every MoE family transformers ships: its routed experts are found by structure (3-D
    weights), and the model is refused rather than scanned as its dense or shared-expert
    MLPs alone (which Qwen2-MoE's and DeepSeek's layers also have)."""
    model = tiny_moe_model(family, num_layers=3, experts=4, d_ff=32)
    experts = find_routed_experts(model)
    dense_first = family.startswith("deepseek")  # DeepSeek's first layer is a dense MLP
    assert len(experts) == (2 if dense_first else 3)
    assert {(e.n_experts, e.d_ff) for e in experts} == {(4, 32)}
    assert all(e.name.endswith(".experts") for e in experts)
    with pytest.raises(GatescopeError) as info:
        find_gated_mlps(model)
    message = str(info.value)
    layers = 2 if dense_first else 3
    assert message.startswith(f"{family} is a mixture-of-experts model ({layers} layers of 4 "
                              f"experts of 32 neurons, the first in {experts[0].name}")  # fmt: skip
    assert "read from the loaded model" in message and "\n" not in message


def test_dense_models_have_no_routed_experts() -> None:
    for family in FAMILIES:
        assert find_routed_experts(tiny_model(family)) == [], family


def test_no_mlp_at_all_raises() -> None:
    with pytest.raises(GatescopeError, match="no gated MLP"):
        find_gated_mlps(nn.Sequential(nn.Linear(3, 3)))


@pytest.mark.parametrize("family", ALL)
def test_unembedding(family: str) -> None:
    model = tiny_model(family)
    w_u = unembedding(model)
    assert w_u.shape == (VOCAB, HIDDEN)
    assert w_u.data_ptr() == model.get_output_embeddings().weight.data_ptr()


def test_unembedding_missing_raises() -> None:
    with pytest.raises(GatescopeError, match="no output embedding"):
        unembedding(nn.Linear(2, 2))


@pytest.mark.parametrize("family", ALL)
def test_refactor_glu_keeps_logits(family: str) -> None:
    model = tiny_model(family, dtype=torch.float64)
    mlps = find_gated_mlps(model)
    ids = _ids()
    negative = sum(int((_cosines(m) < 0).sum()) for m in mlps)
    assert negative > 0  # random weights: about half the neurons
    with torch.no_grad():
        before = model(ids).logits
        flipped = refactor_glu(mlps)
        after = model(ids).logits
    assert flipped == negative
    torch.testing.assert_close(after, before, atol=1e-10, rtol=0)
    assert all(bool((_cosines(m) >= 0).all()) for m in mlps)
    assert refactor_glu(mlps) == 0  # idempotent
    # The refactored weights still describe what the model computes (fused halves included).
    _assert_capture_consistent(model, ids, atol=1e-10)


@pytest.mark.parametrize("family", ["llama_bias", "phi3", "gemma2"])
def test_refactored_glu_restores_bit_exactly(family: str) -> None:
    model = tiny_model(family)
    mlps = find_gated_mlps(model)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(_ids()).logits
    with refactored_glu(mlps) as flipped:
        assert flipped > 0
        assert all(bool((_cosines(m) >= 0).all()) for m in mlps)
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, original[k])]
        assert changed and all(".mlp." in k for k in changed)
        with torch.no_grad():
            torch.testing.assert_close(model(_ids()).logits, before, atol=1e-5, rtol=1e-5)
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key]), key


def test_refactored_glu_restores_on_error() -> None:
    model = tiny_model("llama")
    mlps = find_gated_mlps(model)
    original = mlps[0].w_in().clone()
    with pytest.raises(RuntimeError), refactored_glu(mlps):
        raise RuntimeError("boom")
    assert torch.equal(mlps[0].w_in(), original)


@pytest.mark.parametrize("family", ["llama", "gemma", "phi3"])
def test_tiny_models_hit_all_sign_cases(family: str) -> None:
    """The factory's weights are O(1), so every layer sees all four (gate, in) sign cases."""
    model = tiny_model(family)
    mlps = find_gated_mlps(model)
    cases: dict[int, torch.Tensor] = {}
    handles = [
        m.capture(lambda g, u, i=m.layer: cases.__setitem__(i, 2 * (g < 0) + (u < 0))) for m in mlps
    ]
    with torch.no_grad():
        model(_ids(length=32))
    for h in handles:
        h.remove()
    for layer in cases.values():
        counts = torch.bincount(layer.flatten(), minlength=4)
        assert bool((counts > 0.1 * counts.sum()).all()), counts


def test_tiny_model_is_deterministic() -> None:
    a, b, c = tiny_model("qwen3"), tiny_model("qwen3"), tiny_model("qwen3", seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(
        sa["model.layers.0.mlp.up_proj.weight"], sc["model.layers.0.mlp.up_proj.weight"]
    )


@pytest.fixture(scope="module")
def stories260k_model(stories260k: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(stories260k).eval()


def test_stories260k(stories260k_model: nn.Module) -> None:
    model = stories260k_model
    mlps = find_gated_mlps(model)
    assert len(mlps) == 5 and {m.d_mlp for m in mlps} == {172}
    ids = _ids(vocab=model.config.vocab_size, length=24)
    ids[:, 0] = model.config.bos_token_id
    _assert_capture_consistent(model, ids, atol=1e-4)
    with torch.no_grad():
        before = model(ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with refactored_glu(mlps) as flipped:
        assert 0 < flipped < 5 * 172
        assert all(bool((_cosines(m) >= 0).all()) for m in mlps)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=0)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
