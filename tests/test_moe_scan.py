"""Scans of mixture-of-experts models against a brute force: each expert's MLP run on the
tokens its router chose (from the router's own choice, the raw 3-D weights), the shared
experts' and dense layers' MLPs on every token; statistics of an expert's neurons over its
routed tokens only; routing frequencies summing to the experts per token."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import gatescope
from gatescope.arch import ExpertForward, ExpertLayer, GatedMLP, RoutedForward, find_expert_layers
from gatescope.stats import NeuronStats
from gatescope.stats.routed import RoutedStats, layer_values
from tests.models import MOE_FAMILIES, tiny_moe_model
from tests.test_experts import brute_force
from tests.test_scan import assert_atlas_matches, random_corpus

K = 4


def dense_values(mlp: GatedMLP, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """g, u, act(g) of a gated MLP on rows ``x``, from its weights."""
    g, u = x @ mlp.w_gate().double().T, x @ mlp.w_in().double().T
    return g, u, mlp.act_fn(g)


def expert_layer_values(layer: ExpertLayer, routed_inputs, shared_input, width: int):
    """[tokens, width] g, u, act(g) of one text: each expert's columns on its routed tokens,
    the shared experts' on all; and per expert its counted routed tokens and weights' sum."""
    hidden, top_k_index, top_k_weights = routed_inputs
    values = [torch.zeros(len(hidden), width, dtype=torch.float64) for _ in range(3)]
    routed, weight = np.zeros(layer.routed.n_experts, np.int64), np.zeros(layer.routed.n_experts)
    d_ff = layer.routed.d_ff
    for expert in range(layer.routed.n_experts):
        token, slot = torch.where(top_k_index == expert)
        brute = brute_force(layer.routed, hidden[token], expert)
        for value, expert_value in zip(values, brute, strict=True):
            value[token, expert * d_ff : (expert + 1) * d_ff] = expert_value
        counted = token > 0  # BOS is not counted
        routed[expert] = int(counted.sum())
        weight[expert] = float(top_k_weights[token, slot][counted].sum())
    if layer.shared is not None:
        start = layer.routed.n_experts * d_ff
        x = shared_input.reshape(len(hidden), -1).double()
        for value, shared in zip(values, dense_values(layer.shared, x), strict=True):
            value[:, start : start + layer.shared.d_mlp] = shared
    return values, routed, weight


def per_text_moe_activations(model, corpus, width: int):
    """Brute force input, each text alone: per layer the texts' quantities (as
    tests.test_scan.per_text_activations), [layer, expert] counted routed tokens and the sums
    of their router weights."""
    layers = find_expert_layers(model)
    inputs: dict[tuple[int, str], tuple] = {}

    def keep(key):
        return lambda _module, args: inputs.__setitem__(key, args)

    handles = []
    for i, layer in enumerate(layers):
        if isinstance(layer, ExpertLayer):
            handles.append(layer.routed.module.register_forward_pre_hook(keep((i, "routed"))))
            if layer.shared is not None:
                handles.append(layer.shared.module.register_forward_pre_hook(keep((i, "mlp"))))
        else:
            handles.append(layer.module.register_forward_pre_hook(keep((i, "mlp"))))
    n_experts = next(layer.routed.n_experts for layer in layers if isinstance(layer, ExpertLayer))
    routed = np.zeros((len(layers), n_experts), np.int64)
    router_weight = np.zeros((len(layers), n_experts))
    texts_per_layer = [[] for _ in layers]
    try:
        for text_index, ids in enumerate(corpus["input_ids"]):
            with torch.no_grad():
                model(torch.tensor([ids]))
                for i, layer in enumerate(layers):
                    shared_input = inputs[i, "mlp"][0] if (i, "mlp") in inputs else None
                    if isinstance(layer, ExpertLayer):
                        values, counts, weights = expert_layer_values(
                            layer, inputs[i, "routed"], shared_input, width)  # fmt: skip
                        routed[i] += counts
                        router_weight[i] += weights
                    else:
                        x = shared_input.reshape(len(ids), -1).double()
                        values = [torch.zeros(len(ids), width, dtype=torch.float64)
                                  for _ in range(3)]  # fmt: skip
                        for value, dense in zip(values, dense_values(layer, x), strict=True):
                            value[:, : layer.d_mlp] = dense
                    g, u, a = (value[1:].numpy() for value in values)
                    texts_per_layer[i].append((text_index, {
                        "hook_pre": g, "hook_pre_linear": u, "swish": a, "hook_post": a * u,
                        "position": np.arange(1, len(ids)),
                    }))  # fmt: skip
            inputs.clear()
    finally:
        for handle in handles:
            handle.remove()
    return texts_per_layer, routed, router_weight


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_an_moe_scan_matches_the_brute_force(family):
    model = tiny_moe_model(family, num_layers=2).double()
    corpus = random_corpus(n_texts=7)
    atlas = gatescope.scan(model, corpus, batch_size=3, k=K, progress=False)
    experts = atlas.meta.experts
    assert experts is not None and (experts.n_experts, experts.d_ff, experts.top_k) == (4, 32, 2)
    texts, routed, router_weight = per_text_moe_activations(model, corpus, atlas.d_mlp)
    # Routers weigh the experts in float32 even in a float64 model: a batch (padding) moves
    # the next layer's input, hence its values, by float32 rounding (absolute, about 1e-7,
    # for values near 0). Counts, texts and positions stay exact.
    assert_atlas_matches(atlas, texts, K, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(atlas.tensor("routed").numpy(), routed)
    # Routers take their softmax in float32 (a batch with padding moves it by an ulp or so).
    np.testing.assert_allclose(atlas.tensor("router_weight").numpy(), router_weight, rtol=1e-6)
    moe_layers = [layer for layer in range(2) if layer not in experts.dense_layers]
    shares = atlas.tensor("routed")[moe_layers].sum(dim=1).double() / atlas.tokens
    assert torch.allclose(shares, torch.full_like(shares, experts.top_k))


def test_an_moe_scan_in_shards_merges_into_the_whole_scan(tmp_path):
    """Shards (and so torchrun ranks, resumes) carry the routing too; the merged atlas, saved
    and loaded, is the whole scan's."""
    from gatescope.atlas import Atlas
    from gatescope.merge import merge_atlases
    from tests.test_scale import assert_same_atlas

    model = tiny_moe_model("qwen2_moe", num_layers=2)  # routed and shared experts
    corpus = random_corpus(n_texts=9)
    whole = gatescope.scan(model, corpus, batch_size=2, k=K, progress=False)
    parts = [gatescope.scan(model, corpus, batch_size=3, k=K, progress=False, shard=f"{i}/3")
             for i in range(3)]  # fmt: skip
    merged = Atlas.load(merge_atlases(parts).save(tmp_path / "merged"))
    assert merged.meta.experts == whole.meta.experts
    assert_same_atlas(merged, whole, values_rtol=1e-5)
    assert torch.equal(merged.tensor("routed"), whole.tensor("routed"))
    torch.testing.assert_close(merged.tensor("router_weight"), whole.tensor("router_weight"),
                               rtol=1e-6, atol=0)  # fmt: skip
    layer = merged.layer(1)
    assert layer.routed is not None and int(layer.routed.sum()) == 2 * merged.tokens


def test_glu_scopes_exact_schema_refuses_an_moe_atlas_in_one_sentence(tmp_path):
    """GLUScope's schema has no experts: `export --format gluscope` refuses (exit 1, nothing
    written) and names the formats that take an MoE atlas."""
    from click.testing import CliRunner

    from gatescope.cli import cli
    from gatescope.corpus import save_corpus

    tiny_moe_model("olmoe", num_layers=2).save_pretrained(tmp_path / "model")
    save_corpus(random_corpus(seed=3, n_texts=6), tmp_path / "corpus")
    run = CliRunner().invoke
    atlas = tmp_path / "atlas"
    scan = run(cli, ["scan", "--model", str(tmp_path / "model"), "--corpus",
                     str(tmp_path / "corpus"), "--out", str(atlas), "--k", "2"])  # fmt: skip
    assert scan.exit_code == 0, scan.output
    result = run(cli, ["export", str(atlas), str(tmp_path / "export"), "--format", "gluscope"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "--format gluscope cannot hold a mixture-of-experts atlas" in result.output
    assert "--format hf or parquet" in result.output
    assert not (tmp_path / "export").exists()


def test_an_expert_neurons_address_and_its_place_in_the_layer():
    """layer.expert.neuron <-> the atlas's index, for routed, shared and dense neurons."""
    from gatescope.errors import GatescopeError
    from gatescope.records import ExpertsRecord

    record = ExpertsRecord(n_experts=4, d_ff=32, shared=48, top_k=2, dense_layers=(0,),
                           dense_d_mlp=64)  # fmt: skip
    assert record.width == 4 * 32 + 48
    places = {(layer, index): record.address(layer, index)
              for layer in (0, 1) for index in range(record.width)}  # fmt: skip
    assert places[1, 0] == (0, 0) and places[1, 33] == (1, 1) and places[1, 127] == (3, 31)
    assert places[1, 128] == ("shared", 0) and places[1, 175] == ("shared", 47)
    assert places[0, 63] == ("dense", 63) and places[0, 64] is None  # padding
    for (layer, index), address in places.items():
        if address is not None:
            assert record.index(layer, *address) == index
    for layer, expert, neuron in ((1, 4, 0), (1, 0, 32), (1, "shared", 48), (0, 0, 0),
                                  (0, "dense", 64), (1, "dense", 0)):  # fmt: skip
        with pytest.raises(GatescopeError, match=f"layer {layer} has no neuron"):
            record.index(layer, expert, neuron)
    assert ExpertsRecord.from_dict(record.to_dict()) == record


@pytest.mark.parametrize("fmt", ["hf", "parquet"])
def test_an_moe_atlas_exports_with_an_expert_column_and_imports_back(tmp_path, fmt):
    """Rows named layer.expert.neuron (no rows for the padding of DeepSeek's dense first
    layer), the expert's routed tokens and frequencies among them; the import is the atlas."""
    import datasets
    import pyarrow.parquet as pq

    from gatescope.atlas import TENSORS
    from gatescope.export import export_atlas, from_hf_dataset

    model = tiny_moe_model("deepseek_v3", num_layers=2)  # dense layer 0, shared experts
    atlas = gatescope.scan(model, random_corpus(n_texts=6), batch_size=3, k=K, progress=False)
    out = export_atlas(atlas, tmp_path / f"export.{fmt}", format=fmt)
    dataset = datasets.load_from_disk(str(out)) if fmt == "hf" else pq.read_table(out)
    table = dataset.data.table if fmt == "hf" else dataset
    record = atlas.meta.experts
    assert record is not None
    assert table.num_rows == record.dense_d_mlp + record.width  # no padding rows
    expert = table.column("expert").cast("string").to_pylist()
    neuron, layer = table.column("neuron").to_pylist(), table.column("layer").to_pylist()
    routed = atlas.tensor("routed")
    for row in (0, 63, 64, 64 + 33, 64 + 4 * 32, table.num_rows - 1):
        index = record.index(layer[row], *_parse(expert[row]), neuron[row])
        assert record.address(layer[row], index) == (_parse(expert[row])[0], neuron[row])
        count = atlas.tensor("count")[layer[row], :, index]
        own = int(routed[layer[row], int(expert[row])]) if expert[row].isdigit() else atlas.tokens
        assert table.column("routed")[row].as_py() == own
        for c, case in enumerate(("gate+_in+", "gate+_in-", "gate-_in+", "gate-_in-")):
            assert table.column(f"{case}_routed_freq")[row].as_py() == pytest.approx(
                int(count[c]) / own if own else float("nan"), nan_ok=True
            )
    assert expert[:64] == ["dense"] * 64 and expert[64] == "0" and expert[-1] == "shared"
    back = from_hf_dataset(dataset)
    assert back.meta.experts == record and back.tokens == atlas.tokens
    for name in TENSORS:
        torch.testing.assert_close(back.tensor(name), atlas.tensor(name), equal_nan=True,
                                   rtol=1e-12, atol=0, msg=name)  # fmt: skip
    assert torch.equal(back.tensor("routed"), routed)
    torch.testing.assert_close(back.tensor("router_weight"), atlas.tensor("router_weight"))


def _parse(expert: str) -> tuple[int | str]:
    return (int(expert),) if expert.isdigit() else (expert,)


def random_forward(texts: int, length: int, *, n_experts: int, d_ff: int, shared: int,
                   top_k: int, idle: int, seed: int) -> RoutedForward:  # fmt: skip
    """A layer's forward with random routing (expert ``idle`` never chosen) and values."""
    generator = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    scores = torch.rand(texts * length, n_experts, generator=generator)
    scores[:, idle] = -1
    choice = scores.argsort(dim=1, descending=True)[:, :top_k]  # [rows, k]
    weight = torch.rand(texts * length, top_k, generator=generator)
    silu = torch.nn.functional.silu
    experts = []
    for expert in range(n_experts):
        token, slot = torch.where(choice == expert)  # tokens ascending
        if len(token):
            gate = randn(len(token), d_ff)
            experts.append(ExpertForward(expert, token, gate, randn(len(token), d_ff),
                                         silu(gate), weight[token, slot]))  # fmt: skip
    gate = randn(texts * length, shared)
    return RoutedForward(experts, (gate, randn(texts * length, shared), silu(gate)))


@pytest.mark.parametrize("kernel", ["cpu", "torch", "triton"])
def test_experts_fed_their_packed_tokens_equal_zero_filled_rows(kernel):
    """Each expert sees only its routed tokens, packed per text with their positions in
    their texts: its ranked lists, positions, histograms and typical draws are exactly those
    of the layer's zero-filled rows (a token an expert did not get is in no case), and the
    padding's neurons stay empty. Texts are longer than the passes' blocks; several batches
    exercise the merges."""
    if kernel == "triton":
        pytest.importorskip("gatescope.stats.triton_pass", reason="triton is not installed")
    shape = {"n_experts": 5, "d_ff": 24, "shared": 8}
    width = 5 * 24 + 8 + 3  # with padding
    options = {"k": 3, "kernel": kernel, "seed": 7, "layer": 2}
    accumulator = functools.partial(NeuronStats, act=torch.nn.functional.silu, **options)
    sparse = RoutedStats(width, accumulator, **shape)
    dense = accumulator(width, experts=5)
    texts, length = 4, 37
    for batch in range(3):
        forward = random_forward(texts, length, **shape, top_k=2, idle=3, seed=batch)
        counted = torch.rand(texts, length, generator=torch.Generator().manual_seed(batch)) > 0.2
        text_index = torch.arange(texts) * 3 + batch
        sparse.update(forward, text_index, counted)
        rows = functools.partial(layer_values, n_experts=5, d_ff=24, rows=texts * length,
                                 columns=width, dtype=torch.float32, device="cpu")  # fmt: skip
        gate, up, _ = rows(forward)
        # the model's act(g) in the same rows: layer_values of a forward whose g is act(g)
        assert forward.shared is not None
        _, shared_up, shared_act = forward.shared
        act = rows(RoutedForward([e._replace(gate=e.act) for e in forward.experts],
                                 (shared_act, shared_up, None)))[0]  # fmt: skip
        dense.update(*(x.view(texts, length, width) for x in (gate, up)), text_index, counted,
                     act.view(texts, length, width))  # fmt: skip
        dense.add_routing(*routing_of(forward, counted, 5))
    got = sparse.state_dict()
    assert_same_state(got, dense.state_dict(), sums_rtol=1e-12)  # float64 sums in another order
    assert int(got["routed"][3]) == 0 and int(got["count"][:, 3 * 24 : 4 * 24].sum()) == 0
    assert int(got["typical_text"][:, 5 * 24 : 5 * 24 + 8].max()) >= 0  # the shared experts drew
    restored = RoutedStats(width, accumulator, **shape)
    restored.load_state_dict(got)  # a checkpoint's round trip
    assert_same_state(restored.state_dict(), got)


def assert_same_state(got: dict, expected: dict, sums_rtol: float = 0) -> None:
    """Two statistics' states are equal (NaN where either is), their sums to ``sums_rtol``."""
    assert got.keys() == expected.keys()
    for name in expected:
        rtol = sums_rtol if name in ("sum", "router_weight") else 0
        torch.testing.assert_close(got[name], expected[name], rtol=rtol, atol=rtol,
                                   equal_nan=True, msg=name)  # fmt: skip


def test_a_failed_triton_kernel_sends_every_expert_of_the_layer_to_torch(monkeypatch):
    """An automatic Triton choice that fails (a GPU Triton cannot compile for) fails once per
    layer, not once per expert: the first expert's failure moves them all to the torch pass,
    which gives the torch pass's statistics."""
    pytest.importorskip("gatescope.stats.triton_pass", reason="triton is not installed")
    shape = {"n_experts": 4, "d_ff": 16, "shared": 0}
    layer = functools.partial(RoutedStats, 64, n_experts=4, d_ff=16)
    stats = layer(functools.partial(NeuronStats, act=torch.nn.functional.silu, k=3,
                                    kernel="triton"))  # fmt: skip
    failures = []

    def broken(*_, **__):
        failures.append(1)
        raise RuntimeError("cannot compile")

    for piece in stats.pieces:
        piece._auto_triton = True  # as "auto" sets it on CUDA
        monkeypatch.setattr(piece, "_pass", broken)
    reference = layer(functools.partial(NeuronStats, act=torch.nn.functional.silu, k=3,
                                        kernel="torch"))  # fmt: skip
    forward = random_forward(3, 20, **shape, top_k=2, idle=0, seed=5)
    counted, texts = torch.ones(3, 20, dtype=torch.bool), torch.arange(3)
    with pytest.warns(UserWarning, match="Triton kernel failed"):
        stats.update(forward, texts, counted)
    reference.update(forward, texts, counted)
    assert len(failures) == 1 and stats.kernel == "torch"
    assert {piece.kernel for piece in stats.pieces} == {"torch"}
    assert_same_state(stats.state_dict(), reference.state_dict())


def routing_of(forward: RoutedForward, counted: torch.Tensor, n_experts: int):
    """Per expert, its counted routed tokens and the sum of their router weights."""
    routed = torch.zeros(n_experts, dtype=torch.int64)
    weight = torch.zeros(n_experts, dtype=torch.float64)
    for e in forward.experts:
        kept = counted.reshape(-1)[e.token]
        routed[e.expert] = int(kept.sum())
        weight[e.expert] = e.weight[kept].double().sum()
    return routed, weight


@pytest.mark.slow
def test_torchrun_ranks_of_an_moe_scan_equal_one_process(tmp_path):
    """Two torchrun ranks gather every layer's statistics and routing into rank 0's atlas:
    the one process's atlas."""
    from gatescope.atlas import Atlas
    from gatescope.corpus import save_corpus
    from tests.test_scale import RANK_RTOL, torchrun
    from tests.test_scale import assert_same_atlas as same

    model = tiny_moe_model("qwen2_moe", num_layers=2)
    model.save_pretrained(tmp_path / "model")
    save_corpus(random_corpus(n_texts=6), tmp_path / "corpus")
    single = gatescope.scan(tmp_path / "model", tmp_path / "corpus", batch_size=1, k=K,
                            progress=False)  # fmt: skip
    run = torchrun("--model", str(tmp_path / "model"), "--corpus", str(tmp_path / "corpus"),
                   "--out", str(tmp_path / "atlas"), "--batch-size", "1", "--k", str(K),
                   "--quiet")  # fmt: skip
    output, _ = run.communicate(timeout=300)
    assert run.returncode == 0, output
    ranks = Atlas.load(tmp_path / "atlas")
    assert ranks.meta.experts == single.meta.experts
    same(ranks, single, values_rtol=RANK_RTOL)
    assert torch.equal(ranks.tensor("routed"), single.tensor("routed"))


def test_a_dense_models_atlas_and_export_have_nothing_of_experts(tmp_path):
    """This work leaves dense models as they were: no experts record, no routing tensors,
    GLUScope's columns plus ours and no expert column, neurons addressed layer.neuron."""
    import pyarrow.parquet as pq
    from safetensors import safe_open

    from gatescope.export import export_atlas, schema_columns
    from tests.models import tiny_model

    atlas = gatescope.scan(tiny_model("llama"), random_corpus(n_texts=4), k=K, progress=False)
    saved = atlas.save(tmp_path / "atlas")
    assert "experts" not in (saved / "atlas.json").read_text()
    with safe_open(str(saved / "stats.safetensors"), "pt") as stored:
        assert not {"routed", "router_weight"} & set(stored.keys())
    table = pq.read_table(export_atlas(atlas, tmp_path / "x.parquet", format="parquet"))
    assert table.column_names == schema_columns(quantiles=True)
    assert atlas.routing(0) is None and atlas.neuron(1, 5).routing is None
    assert atlas.neuron_name(1, 5) == "1.5"
