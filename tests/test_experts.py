"""Routed experts of every mixture-of-experts family transformers ships: found by structure,
their gate split as the module splits it, and captured exactly: the model's output does not
change, and each expert's values equal a brute force from its raw 3-D weights on the tokens
the router sent it."""

from __future__ import annotations

import pytest
import torch

from gatescope.errors import GatescopeError
from gatescope.experts import ExpertsCapture, RoutedExperts, find_routed_experts
from tests.models import MOE_FAMILIES, tiny_moe_model

K = 2  # experts per token in tiny_moe_model


def test_a_gate_gatescope_does_not_know_is_refused_by_name(monkeypatch):
    model = tiny_moe_model("mixtral")
    experts = find_routed_experts(model)[0].module
    new_gate = lambda self, gate_up: gate_up[..., :32] * 2  # noqa: E731 (a new family's gate)
    monkeypatch.setattr(type(experts), "_apply_gate", new_gate)
    with pytest.raises(GatescopeError, match=r"MixtralExperts._apply_gate\) gatescope cannot"):
        find_routed_experts(model)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_the_gate_is_split_as_the_module_splits_it(family):
    """act(x_gate) * x_in is bit for bit the module's own _apply_gate."""
    experts = find_routed_experts(tiny_moe_model(family))[0]
    gate_up = torch.randn(50, 2 * experts.d_ff, generator=torch.Generator().manual_seed(0)) * 8
    gate, up, act = experts.split_gate(gate_up)
    assert gate.shape == up.shape == act.shape == (50, experts.d_ff)
    assert torch.equal(act * up, experts.module._apply_gate(gate_up))


def brute_force(experts: RoutedExperts, x: torch.Tensor, expert: int):
    """x_gate, x_in, act(x_gate) of ``expert`` on rows ``x``, from the raw parameters."""
    module = experts.module
    weight = module.gate_up_proj[expert]
    if experts.transposed:  # gpt-oss: [d_model, 2 x d_ff], gate and up interleaved, biases
        bias = module.gate_up_proj_bias[expert]
        gate = x @ weight[:, 0::2] + bias[0::2]
        up = x @ weight[:, 1::2] + bias[1::2]
        gate, up = gate.clamp(max=module.limit), up.clamp(-module.limit, module.limit) + 1
        return gate, up, gate * torch.sigmoid(module.alpha * gate)
    d_ff = experts.d_ff
    gate, up = x @ weight[:d_ff].T, x @ weight[d_ff:].T
    return gate, up, module.act_fn(gate)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_captured_experts_equal_a_brute_force_and_leave_the_output_unchanged(family):
    model = tiny_moe_model(family, num_layers=2).double()
    ids = torch.randint(3, 128, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    found = find_routed_experts(model)
    routed: dict[str, tuple] = {}  # the experts' inputs, as the MoE block routes them
    seen: dict[tuple[str, int], tuple] = {}

    def remember_inputs(name):
        return lambda module, args: routed.__setitem__(name, args)

    def remember(name):
        return lambda expert, *values: seen.__setitem__((name, expert), values)

    hooks = [e.module.register_forward_pre_hook(remember_inputs(e.name)) for e in found]
    captures = [ExpertsCapture(e, remember(e.name)) for e in found]
    with torch.no_grad():
        got = model(input_ids=ids).logits
    for handle in (*hooks, *captures):
        handle.remove()
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)

    for experts in found:
        hidden, top_k_index, top_k_weights = routed[experts.name]
        tokens = hidden.shape[0]
        assert tokens == ids.numel() and top_k_index.shape == (tokens, K)
        routed_tokens = 0
        for expert in range(experts.n_experts):
            token, slot = torch.where(top_k_index == expert)
            if (experts.name, expert) not in seen:
                assert token.numel() == 0
                continue
            got_token, gate, up, act, weight = seen[(experts.name, expert)]
            assert torch.equal(got_token, token)
            torch.testing.assert_close(weight, top_k_weights[token, slot], rtol=0, atol=0)
            references = brute_force(experts, hidden[token], expert)
            for value, reference in zip((gate, up, act), references, strict=True):
                torch.testing.assert_close(value, reference, rtol=1e-12, atol=1e-12)
            routed_tokens += token.numel()
        assert routed_tokens == K * tokens  # every token went to k experts


def test_the_module_gets_its_own_forward_back():
    model = tiny_moe_model("olmoe")
    experts = find_routed_experts(model)[0]
    own = experts.module.forward
    with ExpertsCapture(experts, lambda *_: None):
        assert experts.module.forward is not own
    assert experts.module.forward == own and "forward" not in experts.module.__dict__


#: Per family: the shared experts' neurons beside 4 routed experts of 32 (0: none), and
#: whether the first layer is dense (64 neurons).
SHARED = {"qwen2_moe": 48, "deepseek_v2": 32, "deepseek_v3": 32, "granitemoeshared": 48}


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_each_decoder_layer_is_its_experts_and_shared_mlp_or_a_dense_mlp(family):
    from gatescope.arch import ExpertLayer, GatedMLP, find_expert_layers

    model = tiny_moe_model(family, num_layers=3)
    layers = find_expert_layers(model)
    assert [layer.layer for layer in layers] == [0, 1, 2]
    dense_first = family.startswith("deepseek")
    if dense_first:
        assert isinstance(layers[0], GatedMLP) and layers[0].d_mlp == 64
        assert layers[0].name == "model.layers.0.mlp"
    for index, layer in enumerate(layers[1:] if dense_first else layers, start=int(dense_first)):
        assert isinstance(layer, ExpertLayer) and layer.name == f"model.layers.{index}"
        assert layer.module is model.model.layers[index]
        assert (layer.routed.n_experts, layer.routed.d_ff) == (4, 32)
        shared = SHARED.get(family, 0)
        assert (layer.shared.d_mlp if layer.shared else 0) == shared
        assert layer.d_mlp == 4 * 32 + shared
        if layer.shared is not None:
            assert layer.shared.layer == index and layer.shared.name.startswith(layer.name + ".")


def test_a_dense_model_has_no_expert_layers():
    from gatescope.arch import find_expert_layers
    from tests.models import tiny_model

    with pytest.raises(GatescopeError, match="no routed experts"):
        find_expert_layers(tiny_model("llama"))


def test_under_accelerate_its_hook_still_runs_first():
    """accelerate's hook (a device map) is the module's forward and calls _old_forward: the
    capture replaces that one, so the hook still moves the weights, and gives it back."""
    model = tiny_moe_model("qwen3_moe")
    experts = find_routed_experts(model)[0]
    module, calls = experts.module, []
    own = module.forward

    def hook_forward(*args):  # what accelerate's new_forward does around _old_forward
        calls.append("hook")
        return module._old_forward(*args)

    module._hf_hook, module._old_forward, module.forward = object(), own, hook_forward
    seen = []
    with ExpertsCapture(experts, lambda expert, *_: seen.append(expert)):
        with torch.no_grad():
            model(input_ids=torch.tensor([[5, 6, 7]]))
        assert module.forward is hook_forward and calls == ["hook"] and seen
    assert module._old_forward == own and module.forward is hook_forward
