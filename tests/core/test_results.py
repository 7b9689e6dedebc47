import io
import json
import math
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from matplotlib.figure import Figure

from crosspatch.results.result import Result, collect_versions

matplotlib.use("Agg")


@pytest.fixture
def grid() -> Result:
    values = np.arange(12.0).reshape(3, 4) - 5.0
    values[1, 2] = np.nan
    return Result(
        values,
        ("layer", "head"),
        {"head": ["h0", "h1", "h2", "h3"]},
        {"method": "activation_patching", "metric": "logit_diff", "seed": 0},
    )


# ---------------------------------------------------------------- validation


def test_coerces_values_dims_and_default_coords():
    result = Result([[1, 2], [3, 4]], ["layer", "pos"])
    assert result.values.dtype == np.float64
    assert result.dims == ("layer", "pos")
    assert result.coords == {"layer": [0, 1], "pos": [0, 1]}


def test_numpy_labels_become_python_scalars():
    result = Result(np.zeros(3), ("layer",), {"layer": np.arange(3)})
    assert result.coords["layer"] == [0, 1, 2]
    assert all(type(label) is int for label in result.coords["layer"])


def test_zero_dimensional_result_allowed():
    result = Result(2.5, ())
    assert result.values.shape == ()
    assert "value=2.5" in repr(result)


def test_dims_count_must_match_ndim():
    with pytest.raises(ValueError, match="values has 2"):
        Result(np.zeros((2, 3)), ("layer",))


def test_coord_length_error_names_dim_and_sizes():
    with pytest.raises(ValueError, match=r"coords\['head'\] has 3 labels but values has size 4 along 'head'"):
        Result(np.zeros((2, 4)), ("layer", "head"), {"head": [0, 1, 2]})


def test_unknown_coord_key_lists_dims():
    with pytest.raises(ValueError, match=r"unknown dims \['pos'\].*\['layer', 'head'\]"):
        Result(np.zeros((2, 4)), ("layer", "head"), {"pos": [0, 1]})


def test_repr_is_one_line_with_sizes_and_method(grid):
    text = repr(grid)
    assert text == "Result(dims=(layer=3, head=4), method=activation_patching, metric=logit_diff)"


# ------------------------------------------------------------------- tables


def test_to_pandas_long_form(grid):
    frame = grid.to_pandas()
    assert list(frame.columns) == ["layer", "head", "value"]
    assert len(frame) == 12
    row = frame[(frame["layer"] == 2) & (frame["head"] == "h1")]
    assert row["value"].item() == grid.values[2, 1]
    assert frame.value.isna().sum() == 1


def test_to_pandas_zero_dimensional():
    frame = Result(1.5, ()).to_pandas()
    assert list(frame.columns) == ["value"]
    assert frame.value.tolist() == [1.5]


def test_to_csv_writes_long_form(grid, tmp_path):
    path = grid.to_csv(tmp_path / "sub" / "out")
    assert path == tmp_path / "sub" / "out.csv"
    lines = path.read_text().splitlines()
    assert lines[0] == "layer,head,value"
    assert len(lines) == 13


# ------------------------------------------------------------------ storage


def test_save_load_round_trip_is_exact(tmp_path):
    values = np.random.default_rng(0).normal(size=(3, 5))
    values[0, 1] = np.nan
    values[1, 2] = np.inf
    values[2, 3] = -np.inf
    values[2, 4] = -0.0
    metadata = {"method": "activation_patching", "metric": "logit_diff", "seed": 7, "sites": ["resid_pre.*"]}
    original = Result(values, ("layer", "pos"), {"pos": ["a", "b", "c", "d", "e"]}, metadata)

    path = original.save(tmp_path / "nested" / "run")
    assert path == tmp_path / "nested" / "run.json"
    loaded = Result.load(tmp_path / "nested" / "run")

    assert loaded == original
    assert loaded.values.tobytes() == original.values.tobytes()
    assert Result.load(path) == original


def test_saved_file_is_strict_json(grid, tmp_path):
    document = json.loads(grid.save(tmp_path / "r.json").read_text(), parse_constant=pytest.fail)
    assert document["format"] == "crosspatch.result"
    assert document["version"] == 1
    assert document["dims"] == ["layer", "head"]
    assert document["values"][1][2] is None


def test_save_converts_non_json_metadata(tmp_path):
    torch = pytest.importorskip("torch")
    metadata = {
        "seed": np.int64(3),
        "scale": np.float32(0.5),
        "shape": (2, 3),
        "dtype": torch.float32,
        "path": Path("/x/y"),
        "nested": {"limit": np.float64(np.nan)},
    }
    loaded = Result.load(Result(np.ones(2), ("layer",), metadata=metadata).save(tmp_path / "m"))
    assert loaded.metadata == {
        "seed": 3,
        "scale": 0.5,
        "shape": [2, 3],
        "dtype": "torch.float32",
        "path": "/x/y",
        "nested": {"limit": "nan"},
    }


def test_round_trip_of_zero_dimensional_and_empty(tmp_path):
    scalar = Result(math.pi, (), metadata={"metric": "kl"})
    assert Result.load(scalar.save(tmp_path / "scalar")) == scalar
    empty = Result(np.zeros((0, 3)), ("layer", "pos"))
    assert Result.load(empty.save(tmp_path / "empty")).values.shape == (0, 3)


def test_load_rejects_wrong_format(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"format": "something.else"}))
    with pytest.raises(ValueError, match="other.json"):
        Result.load(path)


def test_load_rejects_invalid_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        Result.load(path)


# ---------------------------------------------------------------- selection


def test_sel_matches_numpy(grid):
    row = grid.sel(layer=2)
    assert row.dims == ("head",)
    assert row.coords == {"head": ["h0", "h1", "h2", "h3"]}
    np.testing.assert_array_equal(row.values, grid.values[2])
    assert row.metadata == grid.metadata

    cell = grid.sel(layer=0, head="h3")
    assert cell.dims == ()
    assert cell.values.item() == grid.values[0, 3]


def test_sel_unknown_dim_and_label(grid):
    with pytest.raises(KeyError, match=r"'pos'.*\['layer', 'head'\]"):
        grid.sel(pos=0)
    with pytest.raises(KeyError, match=r"'h9'.*'head'.*'h0', 'h1'"):
        grid.sel(head="h9")


def test_sel_ambiguous_label_raises():
    result = Result(np.zeros(3), ("pos",), {"pos": [" the", " cat", " the"]})
    with pytest.raises(ValueError, match="ambiguous"):
        result.sel(pos=" the")


def test_mean_matches_numpy(grid):
    clean = Result(np.nan_to_num(grid.values), grid.dims, grid.coords, grid.metadata)
    over_layer = clean.mean("layer")
    assert over_layer.dims == ("head",)
    assert over_layer.coords == {"head": ["h0", "h1", "h2", "h3"]}
    np.testing.assert_allclose(over_layer.values, clean.values.mean(axis=0))
    np.testing.assert_allclose(clean.mean("head").values, clean.values.mean(axis=1))
    with pytest.raises(KeyError, match="pos"):
        clean.mean("pos")


def test_operations_do_not_alias_input():
    source = np.zeros(2)
    result = Result(source, ("layer",))
    source[0] = 1.0
    assert result.values[0] == 0.0


# ----------------------------------------------------------------- plotting


def _image_limits(figure: Figure) -> tuple[float, float]:
    (image,) = figure.axes[0].get_images()
    return image.get_clim()


def test_plot_2d_heatmap_centred_on_zero(grid):
    figure = grid.plot()
    assert isinstance(figure, Figure)
    low, high = _image_limits(figure)
    assert low == -high == -6.0  # max |finite| is 6, NaN ignored
    ax = figure.axes[0]
    assert ax.get_ylabel() == "layer" and ax.get_xlabel() == "head"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["h0", "h1", "h2", "h3"]
    assert ax.get_title() == "activation_patching · logit_diff"
    assert figure.axes[1].get_ylabel() == "logit_diff"  # the colorbar
    assert len(ax.texts) == 11  # small grid is annotated, NaN cell left blank
    figure.savefig(io.BytesIO(), format="png")  # renders through Agg


def test_plot_all_zero_uses_unit_limits():
    figure = Result(np.zeros((2, 2)), ("layer", "head")).plot(annotate=False)
    assert _image_limits(figure) == (-1.0, 1.0)
    assert len(figure.axes[0].texts) == 0
    assert figure.axes[1].get_ylabel() == "value"


def test_plot_thins_ticks_on_large_grids():
    figure = Result(np.ones((4, 200)), ("layer", "pos")).plot()
    ax = figure.axes[0]
    assert len(ax.get_xticks()) <= 64
    assert len(ax.texts) == 0  # too many cells to annotate by default


def test_plot_1d_bars_and_title_with_sites():
    metadata = {"method": "activation_patching", "metric": "logit_diff", "sites": ["head_out.*[head=*]"]}
    result = Result([0.5, -1.0, 0.0, np.nan], ("layer",), metadata=metadata)
    figure = result.plot()
    ax = figure.axes[0]
    assert isinstance(figure, Figure)
    assert len(ax.patches) == 4
    assert ax.get_title().replace("\n", " ") == "activation_patching · logit_diff · head_out.*[head=*]"
    red, blue = ax.patches[0].get_facecolor(), ax.patches[1].get_facecolor()
    assert red[0] > red[2] and blue[2] > blue[0]


def test_plot_into_given_axes(grid):
    figure = Figure()
    ax = figure.add_subplot()
    assert grid.plot(ax, title="custom") is figure
    assert ax.get_title() == "custom"


@pytest.mark.parametrize("shape", [(2, 2, 2), ()])
def test_plot_rejects_other_ranks(shape):
    dims = tuple("abc"[: len(shape)])
    with pytest.raises(ValueError, match=r"\.sel\(.*\.mean\("):
        Result(np.zeros(shape), dims).plot()


# ------------------------------------------------------------------ versions


def test_collect_versions_reports_core_and_never_imports_optional():
    optional = ("transformers", "diffusers", "open_clip")
    before = {name for name in optional if name in sys.modules}
    versions = collect_versions()
    assert {"python", "crosspatch", "torch", "numpy"} <= versions.keys()
    assert versions["numpy"] == np.__version__
    assert {name for name in optional if name in versions} == before
    assert {name for name in optional if name in sys.modules} == before


# ---------------------------------------------------------------- malformed files: one error naming file and field


@pytest.mark.parametrize(
    "content, field",
    [
        (b"\xff\xfe not utf-8", "not UTF-8"),
        (b"[1, 2]", "JSON list, not an object"),
        (b'{"format": "crosspatch.result", "dims": "layer", "coords": {}, "values": []}', "field 'dims'"),
        (b'{"format": "crosspatch.result", "dims": ["layer"], "coords": [], "values": []}', "field 'coords'"),
        (b'{"format": "crosspatch.result", "dims": ["layer"], "coords": {"layer": [0, 1]}, "values": ["x", 1]}',
         "field 'values'"),
        (b'{"format": "crosspatch.result", "dims": ["layer"], "coords": {"layer": [0]}, "values": [1], '
         b'"metadata": 3}', "field 'metadata'"),
        (b'{"format": "crosspatch.result", "version": "1", "dims": [], "coords": {}, "values": 1}', "field 'version'"),
        (b'{"format": "crosspatch.result", "dims": ["layer"], "coords": {"layer": [0]}, "values": [1], '
         b'"skipped": [true, false]}', "field 'skipped'"),
        (b'{"format": "crosspatch.result", "dims": ["layer"], "coords": {"layer": [0]}}', "field 'values' is missing"),
    ],
)
def test_malformed_result_files_raise_one_error_naming_the_file_and_field(tmp_path, content, field):
    from crosspatch.results.formats import FormatError

    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(FormatError, match=field) as info:
        Result.load(path)
    assert "bad.json" in str(info.value)


# ---------------------------------------------------------------- skipped sites and position labels


def test_skipped_sites_survive_save_load_sel_and_mean(tmp_path):
    skipped = np.array([[True, True, False], [True, False, False]])
    res = Result(np.array([[0.0, 0.0, 0.5], [0.0, 0.2, -0.1]]), ("layer", "pos"),
                 {"pos": ["0 When", "1 Mary", "2 and"]}, {}, skipped)
    back = Result.load(res.save(tmp_path / "r"))
    assert back == res and back.skipped.tolist() == skipped.tolist()
    assert res.sel(layer=1).skipped.tolist() == [True, False, False]
    assert res.sel(pos=1).skipped.tolist() == [True, False]  # an int picks "1 Mary"
    assert res.mean("layer").skipped.tolist() == [True, False, False]  # skipped where every layer was
    assert Result(res.values, res.dims, res.coords) != res
    with pytest.raises(ValueError, match="skipped has shape"):
        Result(np.zeros(3), ("pos",), skipped=np.zeros(2, dtype=bool))


def test_plots_draw_skipped_sites_hatched(tmp_path):
    skipped = np.array([[True, True, False], [True, False, False]])
    res = Result(np.array([[0.0, 0.0, 0.5], [0.0, 0.2, -0.1]]), ("layer", "pos"), {}, {"metric": "m"}, skipped)
    ax = res.plot().axes[0]
    assert len([p for p in ax.patches if p.get_hatch()]) == 3
    assert [t.get_text() for t in ax.texts] == ["0.5", "0.2", "-0.1"]  # no number in a skipped cell
    line = res.sel(layer=0)
    ax = line.plot().axes[0]
    hatched = [p for p in ax.patches if p.get_hatch()]
    assert len(hatched) == 2 and "0 by construction" in ax.get_legend().get_texts()[0].get_text()
    figure = res.plot()
    figure.savefig(tmp_path / "skipped.png")


@pytest.mark.parametrize("n, shown", [(14, 14), (64, 64), (65, 33), (200, 40), (1000, 50)])
def test_every_position_is_labelled_up_to_64(n, shown):
    labels = [f"{i} tok{i}" for i in range(n)]
    res = Result(np.linspace(-1, 1, 2 * n).reshape(2, n), ("layer", "pos"), {"pos": labels})
    ax = res.plot().axes[0]
    texts = [t.get_text() for t in ax.get_xticklabels()]
    assert len(texts) == shown and texts[0] == "0 tok0"
    if n <= 64:
        assert texts == labels
