"""The diagnostic sections' typed results: metrics.json entries load into them and dump back unchanged
(so `bayesmeta report` redraws a run from its files), and derived numbers follow their definitions."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from bayesmeta.sections import SECTIONS, CalibrationAt, Exact, Modes, ReliabilityAt, landscape_summary

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)
maybe = st.none() | finite
levels = st.fixed_dictionaries({str(k): st.floats(0, 1) for k in (0.5, 0.8, 0.9, 0.95)})


@st.composite
def calibration_entries(draw: st.DrawFn) -> CalibrationAt:
    exact = draw(st.none() | st.builds(Exact, finite, maybe, levels.map(_floats), levels.map(_floats)))
    share = st.floats(0, 1)
    modes = draw(st.none() | st.builds(Modes, share, st.none() | share, st.integers(0, 99)))
    return CalibrationAt(
        nll=draw(maybe),
        mse=draw(maybe),
        coverage=_floats(draw(levels)),
        width=_floats(draw(levels)),
        pit=draw(st.lists(st.floats(0, 1), max_size=5)),
        pit_ks=draw(maybe),
        diverged_tasks=draw(st.integers(0, 10)),
        modes=modes,
        exact=exact,
    )


def _floats(d: dict[str, float]) -> dict[float, float]:
    return {float(k): v for k, v in d.items()}


@given(st.dictionaries(st.integers(0, 100), calibration_entries(), min_size=1, max_size=3))
def test_calibration_entries_round_trip_through_json(results):
    section = next(s for s in SECTIONS if s.key == "calibration")
    entry = json.loads(json.dumps(section.dump(results)))
    assert section.load(entry) == results
    assert section.dump(section.load(entry)) == entry


def test_the_exact_comparison_is_the_ratio_and_the_gap():
    exact = Exact(nll=1.0, mse=0.5, coverage={0.9: 0.9}, width={0.9: 2.0})
    e = CalibrationAt(2.5, 0.75, {0.9: 0.8}, {0.9: 1.0}, [], 0.1, 0, exact=exact)
    assert e.mse_ratio == 1.5 and e.nll_gap == 1.5
    assert e.dump()["vs_exact"] == {"mse_ratio": 1.5, "nll_gap": 1.5}
    assert CalibrationAt(None, None, {}, {}, [], None, 3, exact=exact).dump()["vs_exact"] == {
        "mse_ratio": None,
        "nll_gap": None,
    }


def test_reliability_and_landscape_entries_round_trip():
    rel = next(s for s in SECTIONS if s.key == "reliability")
    results = {5: ReliabilityAt(0.02, 0.9, 0.3, {"edges": [0.0, 1.0], "count": [3]}, 1)}
    assert rel.load(json.loads(json.dumps(rel.dump(results)))) == results
    land = next(s for s in SECTIONS if s.key == "landscape")
    lr = landscape_summary([1, 2, 3], {"sharpness": [3.0, 2.0, 1.5], "test_mse@1": [3.0, 2.0, 1.0]})
    entry = json.loads(json.dumps(land.dump(lr)))
    assert land.load(entry) == lr and entry["final"] == {"sharpness": 1.5, "test_mse@1": 1.0}
    assert lr.correlation["sharpness"] > 0.9


def test_every_section_owns_a_distinct_metrics_entry():
    keys = [s.key for s in SECTIONS]
    assert len(set(keys)) == len(keys)
