"""Property tests: the config loader and the support-file reader either succeed with valid values or
raise their own error with a one-line message; never another exception."""

from __future__ import annotations

import dataclasses
import io
import tempfile
import typing
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bayesmeta import config, registry
from bayesmeta.sample import MAX_ABS_VALUE, SupportFileError, read_query, read_support

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _dotted_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a config dataclass, tables included."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _dotted_keys(hints[f.name], f"{prefix}{f.name}.")
    return keys


EXTRA_KEYS = ["task.params.amplitude", "task.params.phase", "model.params.learned_lr"]
KEYS = [*_dotted_keys(config.Config), *EXTRA_KEYS]
scalars = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["true", "false", "nan", "inf", "-inf", "1e23", "1e308", "''", "[]", "{}", "[1, 2]"]),
    st.text(max_size=12).map(lambda t: repr(t)),
)
values = st.one_of(
    scalars,
    st.lists(scalars, max_size=4).map(lambda v: "[" + ", ".join(v) + "]"),
    st.text(max_size=20),
)
keys = st.one_of(
    st.sampled_from(KEYS),
    st.builds(lambda k, t: f"{k}.{t}", st.sampled_from(KEYS), st.text(max_size=6)),
    st.text(max_size=15),
)
overrides = st.one_of(st.builds(lambda k, v: f"{k}={v}", keys, values), st.text(max_size=30))


@PROPERTY
@given(overrides)
def test_any_override_is_a_config_or_a_one_line_config_error(item):
    try:
        cfg = registry.load_config(None, [item])
    except config.ConfigError as e:
        assert "\n" not in str(e) and str(e), repr(str(e))
    else:
        assert isinstance(cfg, config.Config)


numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(10**9), 10**9).map(str),
    st.sampled_from(["nan", "inf", "-inf", "1e30", "1e308", "-1e7", "1e6", "0", "", "x", "abc", "1e999"]),
)
rows = st.lists(numbers, min_size=0, max_size=4).map(lambda cells: ",".join(cells))
csv_text = st.lists(st.one_of(rows, st.text(max_size=10)), max_size=6).map(lambda r: "\n".join(r))


def _check(read, content: bytes, suffix: str, width: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"s{suffix}"
        path.write_bytes(content)
        try:
            out = read(path)
        except SupportFileError as e:
            assert "\n" not in str(e) and str(e), repr(str(e))
            return
    arr = np.concatenate(out, 1) if isinstance(out, tuple) else out
    assert arr.ndim == 2 and arr.shape[1] == width and len(arr) >= 1
    assert np.all(np.isfinite(arr)) and np.all(np.abs(arr) <= MAX_ABS_VALUE)


@PROPERTY
@given(csv_text)
def test_csv_like_text_gives_finite_rows_or_one_line(text):
    _check(lambda p: read_support(p, 1, 1), text.encode(), ".csv", 2)
    _check(lambda p: read_query(p, 2), text.encode(), ".csv", 2)


@PROPERTY
@given(st.binary(max_size=300), st.sampled_from([".csv", ".npz", ".txt"]))
def test_arbitrary_bytes_give_finite_rows_or_one_line(raw, suffix):
    _check(lambda p: read_support(p, 1, 1), raw, suffix, 2)


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _full(shape: tuple[int, ...], fill: float, dtype: type) -> np.ndarray:
    with np.errstate(all="ignore"):  # inf/NaN cast to int gives garbage values: also a valid input
        return np.full(shape, fill).astype(dtype)


arrays = st.builds(
    _full,
    st.lists(st.integers(0, 3), max_size=3).map(tuple),
    st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(10**8), 10**8)),
    st.sampled_from([np.float64, np.float32, np.int64]),
)


@PROPERTY
@given(st.dictionaries(st.sampled_from(["x", "y", "z"]), arrays, max_size=3))
def test_npz_archives_give_finite_rows_or_one_line(content):
    _check(lambda p: read_support(p, 1, 1), _npz(content), ".npz", 2)


@PROPERTY
@given(st.dictionaries(st.sampled_from(["x.npy", "y.npy", "x", "y"]), st.binary(max_size=64), max_size=3))
def test_zips_of_arbitrary_members_give_one_line(members):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, raw in members.items():
            z.writestr(name, raw)
    _check(lambda p: read_support(p, 1, 1), buf.getvalue(), ".npz", 2)


@pytest.mark.parametrize(
    ("text", "x", "y"),
    [
        ("x,y\n1,2\n", [[1.0]], [[2.0]]),
        ("1,2\n3,4\n", [[1.0], [3.0]], [[2.0], [4.0]]),
        ("x;y\n-1e6;1e6\n", [[-1e6]], [[1e6]]),  # exactly on the MAX_ABS_VALUE limit: accepted
    ],
)
def test_good_csv_is_read(text, x, y, tmp_path):
    """Valid files are read (no SupportFileError allowed) into the expected x and y columns."""
    assert MAX_ABS_VALUE == 1e6  # the third case sits on the limit
    path = tmp_path / "s.csv"
    path.write_text(text)
    got_x, got_y = read_support(path, 1, 1)
    assert got_x.dtype == got_y.dtype == np.float32
    np.testing.assert_array_equal(got_x, np.array(x, np.float32))
    np.testing.assert_array_equal(got_y, np.array(y, np.float32))
