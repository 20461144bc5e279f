"""The README's numbers are the experiments' numbers, and its Python example runs."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_tables_match_the_committed_results():
    out = subprocess.run(
        [sys.executable, "scripts/readme_tables.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "<!-- results: experiments/maml_sinusoid -->" in (ROOT / "README.md").read_text()


def test_readme_tables_picks_the_kth_table():
    sys.path.insert(0, str(ROOT / "scripts"))
    from readme_tables import nth_table

    md = "# t\n\n| a |\n|---|\n| 1 |\n\ntext\n| b |\n| 2 |\n"
    assert nth_table(md) == "| a |\n|---|\n| 1 |\n"
    assert nth_table(md, 2) == "| b |\n| 2 |\n"
    assert nth_table(md, 3) == ""


def test_readme_python_example_runs(tmp_path, monkeypatch):
    """The first ```python block of the README, with the training shortened."""
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    assert "bayesmeta.train" in code
    code = code.replace(
        '"train.steps=2000"',
        '"train.steps=100", "train.log_every=50", '
        '"train.eval_every=50", "train.checkpoint_every=50", "eval.tasks=20"',
    )
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "runs" / "example" / "inference.nc").is_file()
    # the second block: the fitted run predicts on a support set and re-evaluates
    code = readme_example("bayesmeta.open_run").replace("eval.tasks=100", "eval.tasks=20")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["dt"]["posterior_predictive"]["f"].shape == (1, 20, 100, 1)
    assert scope["metrics"]["eval_tasks"] == 20


def test_options_reference_is_generated_from_the_code():
    out = subprocess.run(
        [sys.executable, "scripts/options_doc.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr


def test_options_reference_lists_every_option_of_every_builtin():
    from bayesmeta.options import options_markdown
    from bayesmeta.registry import families, methods

    text = options_markdown()
    for registry, prefix in ((families, "task.params."), (methods, "model.params.")):
        for name in registry.builtins():
            assert f"### `{name}`" in text
            for field in registry.get(name).Params.__dataclass_fields__:
                assert f"`{prefix}{field}`" in text, (name, field)


def readme_example(marker: str) -> str:
    """The README's ```python block containing `marker`, dedented (list items indent theirs)."""
    readme = (ROOT / "README.md").read_text()
    blocks = [textwrap.dedent(b) for _, b in re.findall(r"^( *)```python\n(.*?)^\1```", readme, re.S | re.M)]
    (code,) = [b for b in blocks if marker in b]
    return code


SHORT = (
    '"train.steps=2000"',
    '"train.steps=20", "train.meta_batch=4", "train.log_every=10", "train.eval_every=10", '
    '"train.checkpoint_every=10", "train.eval_tasks=10", "eval.tasks=10", "eval.batch=10"',
)


def test_readme_arrays_example_runs(tmp_path, monkeypatch):
    """The `arrays` example of the README, with the training shortened."""
    code = readme_example("task.family='arrays'").replace(*SHORT)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "lines.npz").is_file() and (tmp_path / "runs" / "lines" / "metrics.json").is_file()


def test_readme_tfds_images_example_runs(tmp_path, monkeypatch):
    """The `tfds_images` example of the README on the tiny dataset of tests/test_tfds_images.py in
    place of MNIST, with the training and the network shortened."""
    from tests.test_tfds_images import TinyDigits

    TinyDigits(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
    code = readme_example("task.family='tfds_images'")
    for old, new in (
        ("'mnist'", "'tiny_digits'"),
        ("'~/tensorflow_datasets'", f"'{tmp_path / 'tfds'}'"),
        (
            "\"model.net.kind='conv4'\"",
            '"model.net.kind=\'conv4\'", "model.net.filters=4", "model.net.conv=\'xla\'"',
        ),
        SHORT,
    ):
        assert old in code, old
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "runs" / "mnist" / "metrics.json").is_file()
