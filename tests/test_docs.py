"""The README's numbers are the experiments' numbers, and its Python example runs."""

from __future__ import annotations

import re
import subprocess
import sys
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
