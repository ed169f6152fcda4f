"""gatescope.export: the GLUScope schema, exact round trips, GLUScope-like imports, errors."""

from __future__ import annotations

import math
import re

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from gatescope.atlas import Atlas
from gatescope.errors import GatescopeError
from gatescope.export import (
    export_atlas,
    from_hf_dataset,
    import_dataset,
    to_hf_dataset,
)
from gatescope.records import AtlasMeta, AtlasOptions, CorpusRef, ModelRecord
from gatescope.stats import NeuronStats

LAYERS, D_MLP, K = 3, 12, 4
# Written out independently of gatescope.constants: the schema is a published contract.
CASES = ["gate+_in+", "gate+_in-", "gate-_in+", "gate-_in-"]
QUANTITIES = ["hook_pre", "hook_pre_linear", "swish", "hook_post"]
RANKED = [
    (case, quantity)
    for case in CASES
    for quantity in QUANTITIES
    if not (case.startswith("gate+") and quantity == "swish")
]
POSITION_COLUMNS = [f"{case}_{quantity}_max_positions" for case, quantity in RANKED]
EXTREME_COLUMNS = [f"{case}_{q}_{e}" for case in CASES for q in QUANTITIES for e in ("max", "min")]
PROVENANCE = {
    "model": ModelRecord(name="tiny/swiglu", revision="abc"),
    "corpus": CorpusRef(fingerprint="f" * 64, texts=40),
    "options": AtlasOptions(include_bos=False, refactor_glu=True),
}


def expected_columns(extras: bool = True) -> set[str]:
    columns = {"layer", "neuron"}
    columns |= {f"{case}_freq" for case in CASES}
    columns |= {f"{case}_{quantity}_mean" for case in CASES for quantity in QUANTITIES}
    if extras:
        columns |= {f"{case}_{q}_{e}" for case in CASES for q in QUANTITIES for e in ("max", "min")}
    suffixes = ["max_values", "max_indices"] + (["max_positions"] if extras else [])
    columns |= {f"{case}_{quantity}_{s}" for case, quantity in RANKED for s in suffixes}
    return columns


@pytest.fixture(scope="module")
def atlas() -> Atlas:
    """Random statistics. Neuron 0 has g > 0 everywhere: its gate- cases never occur (NaN
    means, empty lists); neuron 1 has u < 0 in only two texts: lists with empty slots."""
    gen = torch.Generator().manual_seed(0)
    layers = [NeuronStats(D_MLP, torch.nn.functional.silu, k=K) for _ in range(LAYERS)]
    texts = torch.randperm(1000, generator=gen)[:40]
    for start in range(0, 40, 8):
        batch, positions = 8, 11
        lengths = torch.randint(3, positions + 1, (batch,), generator=gen)
        valid = torch.arange(positions)[None, :] < lengths[:, None]
        valid[:, 0] = False
        for layer in layers:
            gate = torch.randn(batch, positions, D_MLP, generator=gen)
            up = torch.randn(batch, positions, D_MLP, generator=gen)
            gate[..., 0] = gate[..., 0].abs() + 0.1
            up[..., 1] = up[..., 1].abs() + 0.1
            if start == 0:
                up[:2, 1:3, 1] = -1.0 - torch.rand(2, 2, generator=gen)
            layer.update(gate, up, texts[start : start + batch], valid)
    tokens = int(layers[0].tokens)
    meta = AtlasMeta(layers=LAYERS, d_mlp=D_MLP, k=K, tokens=tokens, **PROVENANCE)
    return Atlas.from_stats(layers, meta)


@pytest.fixture(scope="module")
def dataset(atlas: Atlas) -> datasets.Dataset:
    return to_hf_dataset(atlas)


def assert_same_tensors(a: Atlas, b: Atlas) -> None:
    for name in ("count", "max", "min", "top_value", "top_text", "top_position"):
        assert a.tensor(name).dtype == b.tensor(name).dtype, name
        torch.testing.assert_close(
            a.tensor(name), b.tensor(name), rtol=0, atol=0, equal_nan=True, msg=name
        )
    # The schema stores means, not sums: sum = mean * count is exact up to float64 rounding.
    torch.testing.assert_close(b.tensor("sum"), a.tensor("sum"), rtol=1e-14, atol=0)


def glu_scope_like(dataset: datasets.Dataset) -> datasets.Dataset:
    """The dataset as GLUScope publishes it: no positions or extremes, no metadata in the
    description."""
    table = dataset.remove_columns(POSITION_COLUMNS + EXTREME_COLUMNS).with_format("arrow")[:]
    return datasets.Dataset(table.replace_schema_metadata(None))


def test_columns_match_the_schema(atlas: Atlas, dataset: datasets.Dataset) -> None:
    assert set(dataset.column_names) == expected_columns()
    assert len(dataset.column_names) == len(expected_columns())
    assert "gate+_in+_swish_max_values" not in dataset.column_names
    assert "gate+_in-_swish_max_indices" not in dataset.column_names
    assert "gate-_in+_swish_max_values" in dataset.column_names
    assert not any(name.endswith("_count") for name in dataset.column_names)
    assert dataset.num_rows == LAYERS * D_MLP
    features = dataset.features
    assert features["layer"].dtype == "int32"
    assert features["gate+_in-_freq"].dtype == "float64"
    assert features["gate-_in-_hook_post_mean"].dtype == "float64"
    assert features["gate+_in+_hook_pre_max_values"].feature.dtype == "float32"
    assert features["gate+_in+_hook_pre_max_indices"].feature.dtype == "int32"
    assert features["gate+_in+_hook_pre_max_positions"].feature.dtype == "int32"
    assert dataset["layer"][: D_MLP + 1] == [0] * D_MLP + [1]
    assert dataset["neuron"][: D_MLP + 1] == [*range(D_MLP), 0]


@pytest.mark.parametrize(("layer", "index"), [(0, 0), (1, 1), (2, 7)])
def test_rows_equal_the_neuron_summaries(
    atlas: Atlas, dataset: datasets.Dataset, layer: int, index: int
) -> None:
    row = dataset[layer * D_MLP + index]
    summary = atlas.neuron(layer, index)
    assert (row["layer"], row["neuron"]) == (layer, index)
    for case in CASES:
        assert row[f"{case}_freq"] == summary.freq[case]
        for quantity in QUANTITIES:
            for stat in ("mean", "max", "min"):
                got, expected = row[f"{case}_{quantity}_{stat}"], getattr(summary, stat)[case]
                expected = expected[quantity]
                assert (math.isnan(got) and math.isnan(expected)) or got == expected, stat
    for case, quantity in RANKED:
        examples = summary.top[case][quantity]
        empty = K - len(examples)
        values = [np.float32(e.value) for e in examples] + [0.0] * empty
        assert row[f"{case}_{quantity}_max_values"] == values
        assert row[f"{case}_{quantity}_max_indices"] == [e.text for e in examples] + [-1] * empty
        positions = [e.position for e in examples] + [-1] * empty
        assert row[f"{case}_{quantity}_max_positions"] == positions


def test_fixture_has_empty_cases_and_slots(dataset: datasets.Dataset) -> None:
    row = dataset[0]  # layer 0, neuron 0: g > 0 everywhere
    assert row["gate-_in+_freq"] == 0.0
    assert math.isnan(row["gate-_in+_hook_pre_mean"])
    assert row["gate-_in-_hook_post_max_indices"] == [-1] * K
    assert row["gate-_in-_hook_post_max_values"] == [0.0] * K
    partial = dataset[1]["gate+_in-_hook_pre_max_indices"]  # neuron 1: u < 0 in two texts
    assert partial[2:] == [-1, -1] and min(partial[:2]) >= 0


def test_description_carries_the_meta(atlas: Atlas, dataset: datasets.Dataset) -> None:
    assert from_hf_dataset(dataset).meta == atlas.meta


@pytest.mark.parametrize("fmt", ["hf", "parquet"])
def test_export_and_import_round_trip(atlas: Atlas, tmp_path, fmt: str) -> None:
    out = tmp_path / ("export.parquet" if fmt == "parquet" else "export")
    assert export_atlas(atlas, out, format=fmt) == out
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary left behind
    if fmt == "hf":
        assert datasets.load_from_disk(str(out)).num_rows == LAYERS * D_MLP
    else:
        assert pq.read_metadata(str(out)).num_rows == LAYERS * D_MLP

    imported = import_dataset(out, tmp_path / "atlas", model="renamed/model")
    assert (tmp_path / "atlas" / "atlas.json").exists()
    assert_same_tensors(atlas, imported)
    assert imported.tokens == atlas.tokens
    assert imported.meta.model == ModelRecord(name="renamed/model", revision="abc")
    assert imported.meta.corpus == PROVENANCE["corpus"]
    assert imported.meta.options == PROVENANCE["options"]
    assert imported.meta.imported_from == str(out)
    got, expected = imported.neuron(2, 5), atlas.neuron(2, 5)
    assert got.freq == expected.freq and got.count == expected.count
    assert got.top == expected.top


def test_rows_in_any_order(atlas: Atlas, dataset: datasets.Dataset) -> None:
    assert_same_tensors(atlas, from_hf_dataset(dataset.shuffle(seed=3)))


def test_reexport_of_an_import_is_identical(dataset: datasets.Dataset) -> None:
    again = to_hf_dataset(from_hf_dataset(dataset)).data.table
    assert again.schema.equals(dataset.data.table.schema)
    for name in dataset.column_names:
        column = dataset.data.table.column(name).combine_chunks()
        flat = column.flatten() if pa.types.is_list(column.type) else column
        redone = again.column(name).combine_chunks()
        redone = redone.flatten() if pa.types.is_list(redone.type) else redone
        np.testing.assert_array_equal(
            redone.to_numpy(), flat.to_numpy(), err_msg=name
        )  # NaN == NaN


def test_glu_scope_like_import(atlas: Atlas, dataset: datasets.Dataset, tmp_path) -> None:
    glu = glu_scope_like(dataset)
    assert set(glu.column_names) == expected_columns(extras=False)
    assert glu.info.description in ("", None)

    imported = from_hf_dataset(glu)
    assert imported.tokens is None  # unknown, never invented
    assert imported.neuron(1, 3).count is None
    assert (imported.tensor("top_position") == -1).all()
    assert torch.equal(imported.tensor("top_value"), atlas.tensor("top_value"))
    assert torch.equal(imported.tensor("top_text"), atlas.tensor("top_text"))
    freq = imported.tensor("count").double() / imported.denominator
    expected = atlas.tensor("count").double() / atlas.tokens
    torch.testing.assert_close(freq, expected, rtol=0, atol=1e-9)
    # Of the extremes only each ranked list's strongest value is known.
    got, expected = imported.neuron(1, 3), atlas.neuron(1, 3)
    assert got.min["gate-_in+"]["hook_post"] == expected.min["gate-_in+"]["hook_post"]
    assert got.max["gate+_in+"]["hook_pre"] == expected.max["gate+_in+"]["hook_pre"]
    assert math.isnan(got.max["gate-_in+"]["hook_post"])
    assert math.isnan(got.max["gate+_in+"]["swish"])
    mean = imported.neuron(1, 3).mean["gate-_in+"]["hook_post"]
    assert mean == pytest.approx(atlas.neuron(1, 3).mean["gate-_in+"]["hook_post"], rel=1e-6)

    # With the token count known, the counts are exact again.
    exact = from_hf_dataset(glu, tokens=atlas.tokens)
    assert torch.equal(exact.tensor("count"), atlas.tensor("count"))
    assert exact.tokens == atlas.tokens

    # The same from a plain parquet file, through import_dataset.
    path = tmp_path / "glu.parquet"
    pq.write_table(glu.data.table.replace_schema_metadata(None), str(path))
    loaded = import_dataset(path, tmp_path / "atlas", model="allenai/OLMo-7B-0424-hf")
    assert loaded.meta.model.name == "allenai/OLMo-7B-0424-hf"
    assert loaded.meta.tokens is None
    assert torch.equal(loaded.tensor("top_text"), atlas.tensor("top_text"))


def test_missing_columns_are_listed(dataset: datasets.Dataset) -> None:
    broken = dataset.remove_columns(["gate-_in-_hook_post_mean", "gate+_in+_hook_pre_max_indices"])
    with pytest.raises(
        GatescopeError,
        match=re.escape("columns gate+_in+_hook_pre_max_indices, gate-_in-_hook_post_mean."),
    ):
        from_hf_dataset(broken)


def test_wrong_list_length(dataset: datasets.Dataset) -> None:
    table = dataset.with_format("arrow")[:]
    name = "gate-_in+_swish_max_indices"
    lists = table.column(name).to_pylist()
    lists[5] = lists[5][:-1]
    broken = table.set_column(
        table.column_names.index(name), name, pa.array(lists, pa.list_(pa.int32()))
    )
    with pytest.raises(
        GatescopeError, match=re.escape(f"{name} has a list of length 3 at layer 0, neuron 5")
    ):
        from_hf_dataset(broken)


def test_missing_and_duplicate_neurons(dataset: datasets.Dataset) -> None:
    with pytest.raises(GatescopeError, match="lacks 1 of the 36 neurons"):
        from_hf_dataset(dataset.select([i for i in range(dataset.num_rows) if i != 14]))
    with pytest.raises(GatescopeError, match="more than one row"):
        from_hf_dataset(dataset.select([*range(dataset.num_rows), 3]))


def test_existing_output_and_unknown_format(atlas: Atlas, tmp_path) -> None:
    out = tmp_path / "export"
    export_atlas(atlas, out)
    with pytest.raises(GatescopeError, match="already holds a dataset export: pass --overwrite"):
        export_atlas(atlas, out)
    export_atlas(atlas, out, format="parquet", overwrite=True)  # a folder becomes a file
    assert out.is_file()
    assert pq.read_metadata(str(out)).num_rows == LAYERS * D_MLP
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]

    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(GatescopeError, match="is not empty and holds no dataset export"):
        export_atlas(atlas, other, overwrite=True)
    assert (other / "keep.txt").exists()

    with pytest.raises(GatescopeError, match="unknown export format 'csv'"):
        export_atlas(atlas, tmp_path / "x.csv", format="csv")

    import_dataset(out, tmp_path / "atlas")
    with pytest.raises(GatescopeError, match="already holds an atlas"):
        import_dataset(out, tmp_path / "atlas")


def test_import_sources_that_do_not_load(tmp_path) -> None:
    with pytest.raises(GatescopeError, match="does not exist"):
        import_dataset(tmp_path / "absent.parquet", tmp_path / "atlas")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(GatescopeError, match="neither a parquet file nor a GLUScope summary"):
        import_dataset(tmp_path / "data.csv", tmp_path / "atlas")
    with pytest.raises(GatescopeError, match="Hugging Face dataset id failed"):
        import_dataset("nobody/no-such-dataset", tmp_path / "atlas")
