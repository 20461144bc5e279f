"""A corpus of bad inputs through `bayesmeta.cli.main`: a non-zero exit, one stderr line starting with
`bayesmeta:` that names the offending key or file, and never a traceback."""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from bayesmeta import config, registry
from bayesmeta.cli import main
from bayesmeta.datasets import omniglot as data
from tests.conftest import SMALL

CONFIG, RUN = 2, 1


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A run folder as `report` reads it (config.toml, inference.nc, metrics.json); no checkpoint."""
    run = tmp_path_factory.mktemp("run")
    (run / "config.toml").write_text(config.dumps(registry.load_config(None, SMALL)))
    stats = xr.Dataset(
        {"loss": ("step", np.linspace(2, 1, 20, dtype=np.float32))}, coords={"step": np.arange(1, 21)}
    )
    xr.DataTree.from_dict({"sample_stats": stats}).to_netcdf(run / "inference.nc", engine="h5netcdf")
    entry = {"mean": 0.5, "ci95": 0.1, "median": 0.4, "n": 40, "n_diverged": 0, "max_share": 0.05}
    metrics = {
        "name": "default",
        "method": "maml",
        "family": "sinusoid",
        "eval_family": "sinusoid",
        "seed": 0,
        "steps": 20,
        "train_seconds": 1.0,
        "eval_seconds": 1.0,
        "eval_tasks": 40,
        "final_loss": 1.0,
        "metrics": {"mse@1": entry},
    }
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def test_the_intact_run_folder_reports(run_folder, tmp_path, capsys):
    """The control: the folder the corpus corrupts is reported without error."""
    run = shutil.copytree(run_folder, tmp_path / "run")
    assert main(["report", str(run)]) == 0, capsys.readouterr().err
    assert (run / "summary.md").is_file()


def _png(side: int = data.SIDE) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((side, side), 255, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _archives(d: Path, members: dict[str, bytes]) -> Path:
    """The two minimal archives (small1, small2), both holding `members`."""
    d.mkdir(parents=True, exist_ok=True)
    for name in (data.ARCHIVES["small1"], data.ARCHIVES["small2"]):
        with zipfile.ZipFile(d / name, "w") as z:
            for m, content in members.items():
                z.writestr(m, content)
    return d


GOOD = {f"images_background_small1/Alpha/character01/0001_{i:02d}.png": _png() for i in (1, 2)}
OMNIGLOT_ARCHIVES = {
    "omniglot-flat-layout": {"Alpha/0001_01.png": _png()},
    "omniglot-bad-file-name": {"s/Alpha/c/first.png": _png()},
    "omniglot-no-images": {"readme.txt": b"nothing here"},
    "omniglot-bad-png": {**GOOD, "images_background_small1/Alpha/character01/0001_03.png": b"not a png"},
    "omniglot-wrong-size-png": {**GOOD, "images_background_small1/Alpha/character01/0001_03.png": _png(20)},
}


def _omniglot(members: dict[str, bytes]) -> Callable[[Path, Path], list[str]]:
    def argv(tmp: Path, run: Path) -> list[str]:
        arch = _archives(tmp / "archives", members)
        sets = [
            "task.family='omniglot'",
            "model.likelihood='categorical'",
            f"task.params.archives='{arch}'",
            f"task.params.data_dir='{tmp / 'tfds'}'",
        ]
        return ["fit", "--run-dir", str(tmp / "new"), *(a for s in sets for a in ("--set", s))]

    return argv


def _fit(*sets: str) -> Callable[[Path, Path], list[str]]:
    return lambda tmp, run: ["fit", "--run-dir", str(tmp / "new"), *(a for s in sets for a in ("--set", s))]


def _config_file(content: bytes | str, *sets: str) -> Callable[[Path, Path], list[str]]:
    def argv(tmp: Path, run: Path) -> list[str]:
        path = tmp / "c.toml"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return ["fit", str(path), "--run-dir", str(tmp / "new"), *(a for s in sets for a in ("--set", s))]

    return argv


def _support(name: str, content: bytes | str | dict, *extra: str, query: str | None = None):
    """`sample RUN --support FILE` with FILE holding `content` (bytes, text or arrays for np.savez)."""

    def argv(tmp: Path, run: Path) -> list[str]:
        path = tmp / name
        if isinstance(content, dict):
            np.savez(path, **content)
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
        q = []
        if query is not None:
            (tmp / "q.csv").write_text(query)
            q = ["--query", str(tmp / "q.csv")]
        return ["sample", str(run), "--support", str(path), *q, *extra]

    return argv


def _run_file(name: str, content: bytes | str | None, command: str = "report", *extra: str):
    """`command RUN` after replacing (None: deleting) the run folder's file `name`."""

    def argv(tmp: Path, run: Path) -> list[str]:
        path = run / name
        if content is None:
            path.unlink()
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return [command, str(run), *extra]

    return argv


def _truncated(name: str, keep: float, command: str = "report"):
    def argv(tmp: Path, run: Path) -> list[str]:
        raw = (run / name).read_bytes()
        (run / name).write_bytes(raw[: int(len(raw) * keep)])
        return [command, str(run)]

    return argv


def _metrics(change: Callable[[dict], object]):
    def argv(tmp: Path, run: Path) -> list[str]:
        m = json.loads((run / "metrics.json").read_text())
        change(m)
        (run / "metrics.json").write_text(json.dumps(m))
        return ["report", str(run)]

    return argv


def _args(*argv: str) -> Callable[[Path, Path], list[str]]:
    return lambda tmp, run: [a.replace("RUN", str(run)) for a in argv]


CASES = {
    # --- --set overrides -------------------------------------------------------------------------- #
    "set-without-equals": (_fit("train.steps"), CONFIG, "train.steps"),
    "set-empty-key": (_fit("=3"), CONFIG, "--set ''"),
    "set-double-dot": (_fit("a..b=1"), CONFIG, "a..b"),
    "set-trailing-dot": (_fit("train.=1"), CONFIG, "train."),
    "set-newline-in-key": (_fit("train\nsteps=1"), CONFIG, "train\\nsteps"),
    "set-under-an-integer": (_fit("seed.x=1"), CONFIG, "seed is not a table"),
    "set-under-a-string": (_fit("name.x=1"), CONFIG, "name is not a table"),
    "set-under-a-leaf-deep": (_fit("train.steps.x.y=1"), CONFIG, "train.steps is not a table"),
    "set-unknown-top-key": (_fit("colour=1"), CONFIG, "colour: unknown key"),
    "set-unknown-nested-key": (_fit("train.lrr=0.1"), CONFIG, "train.lrr: unknown key"),
    "set-task-not-table": (_fit("task=1"), CONFIG, "task: expected a table"),
    "set-eval-not-table": (_fit("eval=1"), CONFIG, "eval: expected a table"),
    "set-eval-task-not-table": (_fit("eval.task=[1]"), CONFIG, "eval.task: expected a table"),
    "set-net-not-table": (_fit("model.net='mlp'"), CONFIG, "model.net: expected a table"),
    "set-params-not-table": (_fit("task.params=[1]"), CONFIG, "task.params: expected a table"),
    "huge-seed": (
        _fit("seed=99999999999999999999"),
        CONFIG,
        "seed: expected an integer >= 0 and <= 4294967295",
    ),
    "seed-2**32": (_fit("seed=4294967296"), CONFIG, "seed: expected an integer"),
    "negative-seed": (_fit("seed=-1"), CONFIG, "seed: expected an integer >= 0"),
    "huge-eval-seed": (_fit("eval.seed=99999999999999999999"), CONFIG, "eval.seed: expected an integer"),
    "steps-1e23-float": (_fit("train.steps=1e23"), CONFIG, "train.steps: expected an integer"),
    "steps-over-limit": (
        _fit("train.steps=10000000000"),
        CONFIG,
        "train.steps: expected an integer >= 1 and <= 1000000000",
    ),
    "huge-hidden-width": (_fit("model.net.hidden=[99999999999999999999]"), CONFIG, "model.net.hidden[0]"),
    "huge-inner-steps": (_fit("eval.inner_steps=[1, 10000000000]"), CONFIG, "eval.inner_steps[1]"),
    "huge-shots": (_fit("task.shots=99999999999999999999"), CONFIG, "task.shots: expected an integer"),
    "nan-learning-rate": (_fit("train.lr=nan"), CONFIG, "train.lr: expected a number > 0"),
    "inf-learning-rate": (_fit("train.lr=inf"), CONFIG, "train.lr"),
    "bool-for-int": (_fit("train.steps=true"), CONFIG, "train.steps"),
    "list-for-str": (_fit("model.method=['maml']"), CONFIG, "model.method"),
    "name-parent-dir": (_fit("name='../x'"), CONFIG, "name: expected a string matching"),
    "name-absolute": (_fit("name='/tmp/x'"), CONFIG, "name: expected a string matching"),
    "name-dot-dot": (_fit("name='..'"), CONFIG, "name: expected a string matching"),
    "name-dot": (_fit("name='.'"), CONFIG, "name"),
    "name-empty": (_fit("name=''"), CONFIG, "name"),
    "name-with-slash": (_fit("name='a/b'"), CONFIG, "name"),
    "name-with-backslash": (_fit("name='a\\\\b'"), CONFIG, "name"),
    "name-with-newline": (_fit('name="a\\nb"'), CONFIG, "name"),
    "empty-inner-steps": (_fit("eval.inner_steps=[]"), CONFIG, "eval.inner_steps"),
    # --- config files ------------------------------------------------------------------------------ #
    "config-not-utf8": (_config_file(b"\xff\xfe[train]\nsteps = 3\n"), CONFIG, "not UTF-8"),
    "config-latin1": (_config_file('name = "caf\xe9"\n'.encode("latin-1")), CONFIG, "c.toml: not UTF-8"),
    "config-bad-toml": (_config_file("[train\nsteps = 3"), CONFIG, "c.toml: not valid TOML"),
    "config-top-level-array": (_config_file("[1, 2]"), CONFIG, "c.toml: not valid TOML"),
    "config-task-is-string": (_config_file('task = "sinusoid"\n'), CONFIG, "task: expected a table"),
    "config-eval-is-list": (_config_file("eval = [1]\n"), CONFIG, "eval: expected a table"),
    "config-unknown-section": (_config_file("[trian]\nsteps = 3\n"), CONFIG, "trian: unknown key"),
    "config-bad-name": (_config_file('name = "../../etc"\n'), CONFIG, "name: expected a string matching"),
    "config-set-under-file-leaf": (_config_file("seed = 3\n", "seed.a=1"), CONFIG, "seed is not a table"),
    "config-is-a-directory": (lambda tmp, run: ["fit", str(tmp)], CONFIG, "is a directory"),
    "config-missing": (
        lambda tmp, run: ["fit", str(tmp / "nope.toml")],
        CONFIG,
        "nope.toml: config file not found",
    ),
    "config-empty-name-key": (_config_file('"" = 1\n'), CONFIG, "'': unknown key"),
    "config-quoted-key-newline": (
        _config_file('[model.params]\n"a\\nb" = 1\n'),
        CONFIG,
        "'a\\nb': unknown key",
    ),
    # --- command-line arguments -------------------------------------------------------------------- #
    "sample-steps-negative": (
        _args("sample", "RUN", "--steps", "-1"),
        CONFIG,
        "--steps: expected an integer >= 0",
    ),
    "sample-steps-huge": (_args("sample", "RUN", "--steps", "99999999999999999999"), CONFIG, "--steps"),
    "sample-samples-zero": (
        _args("sample", "RUN", "--samples", "0"),
        CONFIG,
        "--samples: expected an integer >= 1",
    ),
    "sample-samples-huge": (_args("sample", "RUN", "--samples", "10000000"), CONFIG, "--samples"),
    "sample-task-seed-negative": (_args("sample", "RUN", "--task-seed", "-1"), CONFIG, "--task-seed"),
    "sample-task-seed-huge": (
        _args("sample", "RUN", "--task-seed", "99999999999999999999"),
        CONFIG,
        "--task-seed",
    ),
    "sample-samples-not-int": (_args("sample", "RUN", "--samples", "many"), CONFIG, "--samples"),
    "sample-out-is-a-file": (_args("sample", "RUN", "--out", "RUN/metrics.json"), CONFIG, "--out"),
    "unknown-command": (_args("train"), CONFIG, "invalid choice: 'train'"),
    "unknown-option": (_args("report", "RUN", "--fast"), CONFIG, "--fast"),
    "no-command": (_args(), CONFIG, "command"),
    # --- support and query files ------------------------------------------------------------------- #
    "support-nan-first-row": (_support("s.csv", "nan,1\n2,3\n"), RUN, "s.csv: line 1, column 1 is nan"),
    "support-inf-first-row": (_support("s.csv", "inf,1\n"), RUN, "s.csv: line 1, column 1 is inf"),
    "support-nan-after-header": (
        _support("s.csv", "x,y\n1,2\n3,nan\n"),
        RUN,
        "s.csv: line 3, column 2 is nan",
    ),
    "support-minus-inf": (_support("s.csv", "1,-inf\n"), RUN, "s.csv: line 1, column 2 is -inf"),
    "support-1e30": (_support("s.csv", "x,y\n1e30,1\n"), RUN, "s.csv: line 2, column 1 is 1e+30"),
    "support-1e308": (_support("s.csv", "1,1e308\n"), RUN, "s.csv: line 1, column 2 is 1e+308"),
    "support-overflowing-literal": (_support("s.csv", "1,1e999\n"), RUN, "s.csv: line 1, column 2 is inf"),
    "support-ragged": (_support("s.csv", "1,2\n3\n"), RUN, "s.csv: line 2 has 1 columns"),
    "support-three-columns": (_support("s.csv", "1,2,3\n"), RUN, "s.csv: expected shape (K, 2)"),
    "support-empty": (_support("s.csv", ""), RUN, "s.csv: expected shape (K, 2) with K >= 1"),
    "support-header-only": (_support("s.csv", "x,y\n"), RUN, "s.csv: expected shape"),
    "support-blank-lines-only": (_support("s.csv", "\n\n  \n"), RUN, "s.csv: expected shape"),
    "support-text-cell": (
        _support("s.csv", "x,y\n1,abc\n"),
        RUN,
        "s.csv: line 2, column 2: 'abc' is not a number",
    ),
    "support-mixed-first-row": (
        _support("s.csv", "1,abc\n2,3\n"),
        RUN,
        "s.csv: line 1, column 2: 'abc' is not a number",
    ),
    "support-empty-cell": (_support("s.csv", "1,\n"), RUN, "s.csv: line 1, column 2: '' is not a number"),
    "support-not-utf8": (_support("s.csv", b"\xff\xfe1,2\n"), RUN, "s.csv: not UTF-8"),
    "support-binary": (_support("s.csv", bytes(range(256))), RUN, "s.csv"),
    "support-is-directory": (
        lambda tmp, run: ["sample", str(run), "--support", str(run)],  # the run folder: a directory
        RUN,
        "/run: is a directory",
    ),
    "support-missing": (
        lambda tmp, run: ["sample", str(run), "--support", str(tmp / "n.csv")],
        RUN,
        "n.csv: not found",
    ),
    "support-too-large": (
        _support("s.csv", b"1,2\n" * 2_600_000),
        RUN,
        "s.csv: 10400000 bytes, over the limit of 10000000 bytes",
    ),
    "npz-not-a-zip": (_support("s.npz", b"not a zip"), RUN, "s.npz: not an NPZ archive"),
    "npz-pickled": (
        _support("s.npz", {"x": np.array([None, 1]), "y": np.zeros(2)}),
        RUN,
        "s.npz: not a readable NPZ archive (it holds pickled",
    ),
    "npz-nan": (
        _support("s.npz", {"x": np.array([0.0, np.nan]), "y": np.zeros(2)}),
        RUN,
        "s.npz: array x at index [1] is nan",
    ),
    "npz-huge": (
        _support("s.npz", {"x": np.zeros(2), "y": np.array([[0.0], [2e6]])}),
        RUN,
        "s.npz: array y at index [1, 0]",
    ),
    "npz-without-y": (_support("s.npz", {"x": np.zeros(3)}), RUN, "s.npz: expected arrays x and y"),
    "npz-row-mismatch": (
        _support("s.npz", {"x": np.zeros(2), "y": np.zeros(3)}),
        RUN,
        "s.npz: x has 2 rows, y has 3",
    ),
    "npz-strings": (
        _support("s.npz", {"x": np.array(["a"]), "y": np.zeros(1)}),
        RUN,
        "s.npz: array x has dtype",
    ),
    "npz-empty": (
        _support("s.npz", {"x": np.zeros(0), "y": np.zeros(0)}),
        RUN,
        "s.npz: expected shape (K, 2)",
    ),
    "query-nan": (_support("s.csv", "1,2\n", query="x\n0.5\nnan\n"), RUN, "q.csv: line 3, column 1 is nan"),
    "query-two-columns": (_support("s.csv", "1,2\n", query="1,2\n"), RUN, "q.csv: expected shape (K, 1)"),
    # --- run-folder files -------------------------------------------------------------------------- #
    "report-no-metrics": (
        _run_file("metrics.json", None),
        RUN,
        "no metrics.json, so the run was not evaluated yet",
    ),
    "report-truncated-metrics": (_truncated("metrics.json", 0.5), RUN, "metrics.json: not valid JSON"),
    "report-empty-metrics": (_run_file("metrics.json", ""), RUN, "metrics.json: not valid JSON"),
    "report-metrics-not-utf8": (_run_file("metrics.json", b"\xff{}"), RUN, "metrics.json: not UTF-8"),
    "report-metrics-a-list": (_run_file("metrics.json", "[]"), RUN, "metrics.json: expected a JSON object"),
    "report-metrics-missing-entry": (
        _metrics(lambda m: m.pop("steps")),
        RUN,
        "metrics.json: entry 'steps' missing",
    ),
    "report-metrics-wrong-type": (
        _metrics(lambda m: m.update(train_seconds="1 s")),
        RUN,
        "metrics.json: entry 'train_seconds' missing or not a number",
    ),
    "report-metric-without-mean": (
        _metrics(lambda m: m["metrics"]["mse@1"].pop("mean")),
        RUN,
        "metrics.json: metrics.mse@1.mean",
    ),
    "report-metric-not-a-table": (
        _metrics(lambda m: m["metrics"].update(bad=3)),
        RUN,
        "metrics.json: metrics.bad.mean",
    ),
    "report-malformed-calibration": (
        _metrics(lambda m: m.update(calibration={"1": {}})),
        RUN,
        "metrics.json",
    ),
    "report-no-inference": (_run_file("inference.nc", None), RUN, "run/inference.nc: no inference file"),
    "report-truncated-inference": (
        _truncated("inference.nc", 0.5),
        RUN,
        "inference.nc: not a readable netCDF",
    ),
    "report-truncated-inference-header": (_truncated("inference.nc", 0.01), RUN, "inference.nc"),
    "report-empty-inference": (_run_file("inference.nc", b""), RUN, "inference.nc"),
    "report-text-as-inference": (_run_file("inference.nc", "not netcdf"), RUN, "inference.nc"),
    "report-folder-missing": (
        lambda tmp, run: ["report", str(tmp / "nope")],
        RUN,
        "nope/inference.nc: no inference",
    ),
    "evaluate-config-not-utf8": (
        _run_file("config.toml", b"\xff\xfe", "evaluate"),
        CONFIG,
        "config.toml: not UTF-8",
    ),
    "evaluate-config-truncated": (_truncated("config.toml", 0.5, "evaluate"), CONFIG, "config.toml"),
    "evaluate-bad-set": (_args("evaluate", "RUN", "--set", "eval.tasks=0"), CONFIG, "eval.tasks"),
    "sample-config-bad-name": (
        _run_file("config.toml", 'name = "../x"\n', "sample"),
        CONFIG,
        "config.toml: name: expected",
    ),
    # --- Omniglot archives (tiny stand-ins made here; nothing is downloaded) ------------------------ #
    **{k: (_omniglot(v), RUN, data.ARCHIVES["small1"]) for k, v in OMNIGLOT_ARCHIVES.items()},
}


@pytest.mark.parametrize(("make_argv", "code", "names"), CASES.values(), ids=CASES.keys())
def test_bad_input_is_one_line(make_argv, code, names, run_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data, "DEFAULT_DIRS", ())
    monkeypatch.delenv(data.ENV_ARCHIVES, raising=False)
    run = shutil.copytree(run_folder, tmp_path / "run")
    argv = make_argv(tmp_path, run)
    assert main(argv) == code
    out = capsys.readouterr()
    lines = out.err.splitlines()
    assert len(lines) == 1, out.err
    assert lines[0].startswith("bayesmeta:") and "Traceback" not in out.err + out.out
    assert names in lines[0], lines[0]
    assert not (tmp_path / "new").exists()  # a refused fit writes nothing


def test_corpus_size():
    assert len(CASES) >= 60


def test_a_failed_omniglot_preparation_does_not_block_the_next(tmp_path, monkeypatch, capsys):
    """A bad PNG stops the preparation; with the archive repaired, the same data folder prepares."""
    monkeypatch.setattr(data, "DEFAULT_DIRS", ())
    arch = _archives(tmp_path / "archives", OMNIGLOT_ARCHIVES["omniglot-bad-png"])
    with pytest.raises(data.DataError, match=r"0001_03\.png is not a readable PNG image"):
        data.prepare("minimal", str(arch), str(tmp_path / "tfds"))
    left = [p for p in (tmp_path / "tfds").rglob("*") if "1.0.0" in p.name]
    assert not left, left
    _archives(arch, GOOD)
    assert len(data.prepare("minimal", str(arch), str(tmp_path / "tfds")).as_data_source("small1")) == 2


def test_runs_archive_without_an_answer_key(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEFAULT_DIRS", ())
    with zipfile.ZipFile(tmp_path / data.ARCHIVES["runs"], "w") as z:
        z.writestr("run01/training/class01.png", _png())
        z.writestr("run01/test/item01.png", _png())
    with pytest.raises(data.DataError, match=r"run01/class_labels.txt is missing"):
        data.prepare("runs", str(tmp_path), str(tmp_path / "tfds"))
