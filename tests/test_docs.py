"""The docs (README.md and the site in docs/) carry the experiments' numbers, build with `mkdocs build
--strict`, link only to what exists, and their marked Python examples run."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# A runnable example is a ```python block directly after a line `<!-- example: NAME -->` (both indented
# alike inside a list item). NAME is unique over docs/; the README may repeat a docs example verbatim.
EXAMPLE = re.compile(r"^( *)<!-- example: (\S+) -->\n\1```python\n(.*?)^\1```", re.S | re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)")  # a Markdown link's target


def examples(path: Path) -> dict[str, str]:
    """The runnable examples of one Markdown file by name, dedented."""
    found: dict[str, str] = {}
    for _, name, code in EXAMPLE.findall(path.read_text()):
        assert name not in found, f"{path.name}: two examples named {name}"
        found[name] = textwrap.dedent(code)
    return found


def doc_examples() -> dict[str, str]:
    """Every runnable example of docs/*.md by name."""
    found: dict[str, str] = {}
    for path in sorted(DOCS.glob("*.md")):
        for name, code in examples(path).items():
            assert name not in found, f"two docs examples named {name}"
            found[name] = code
    return found


def example(name: str) -> str:
    return doc_examples()[name]


# the examples the tests below run; a new marked example needs a test here
RUN = {"quickstart", "open_run", "arrays", "tfds_images"}


def test_every_marked_example_is_run_by_a_test():
    assert set(doc_examples()) == RUN


def test_readme_examples_are_docs_examples_run_here():
    readme = examples(ROOT / "README.md")
    assert "quickstart" in readme
    for name, code in readme.items():
        assert doc_examples().get(name) == code, f"README example {name} differs from the docs' one"


def test_examples_are_ruff_clean():
    """The examples are linted and formatted as the code is (ruff does not read Markdown)."""
    for name, code in doc_examples().items():
        for command in (["check", "--quiet"], ["format", "--check", "--quiet"]):
            out = subprocess.run(
                [sys.executable, "-m", "ruff", *command, "--stdin-filename", f"{name}.py", "-"],
                cwd=ROOT,
                input=code,
                capture_output=True,
                text=True,
            )
            assert out.returncode == 0, (name, command, out.stdout + out.stderr)


def test_example_markers_mark_python_blocks():
    """A marker not directly followed by a ```python block would silently drop its example."""
    for path in [ROOT / "README.md", *DOCS.glob("*.md")]:
        text = path.read_text()
        assert text.count("<!-- example: ") == len(EXAMPLE.findall(text)), path.name


def test_results_tables_match_the_committed_results():
    out = subprocess.run(
        [sys.executable, "scripts/readme_tables.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "<!-- results: experiments/maml_sinusoid -->" in (DOCS / "results.md").read_text()
    assert "<!-- results: experiments/bench -->" in (DOCS / "benchmarks.md").read_text()


def test_results_tables_are_kept_wherever_the_markers_are(tmp_path, monkeypatch, capsys):
    """--check names a docs page whose table differs from its RESULTS.md; a rewrite restores it."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import readme_tables

    (tmp_path / "docs").mkdir()
    (tmp_path / "experiments").symlink_to(ROOT / "experiments")
    (tmp_path / "README.md").write_text((ROOT / "README.md").read_text())
    page = (DOCS / "results.md").read_text()
    stale = page.replace("| maml | 5-shot | mse@1 | 0.", "| maml | 5-shot | mse@1 | 9.", 1)
    assert stale != page
    (tmp_path / "docs" / "results.md").write_text(stale)
    monkeypatch.setattr(readme_tables, "ROOT", tmp_path)
    monkeypatch.setattr(sys, "argv", ["readme_tables.py", "--check"])
    assert readme_tables.main() == 1
    assert "docs/results.md" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["readme_tables.py"])
    assert readme_tables.main() == 0
    assert (tmp_path / "docs" / "results.md").read_text() == page


def test_results_tables_picks_the_kth_table():
    sys.path.insert(0, str(ROOT / "scripts"))
    from readme_tables import nth_table

    md = "# t\n\n| a |\n|---|\n| 1 |\n\ntext\n| b |\n| 2 |\n"
    assert nth_table(md) == "| a |\n|---|\n| 1 |\n"
    assert nth_table(md, 2) == "| b |\n| 2 |\n"
    assert nth_table(md, 3) == ""


def test_docs_site_builds_strictly(tmp_path):
    """mkdocs.yml has strict: true: a broken link or anchor, or a page left out of the nav, fails."""
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "site" / "results" / "index.html").is_file()
    # a link from docs/ to a repository file is published beside the pages
    assert (tmp_path / "site" / "repo" / "experiments" / "maml_sinusoid" / "RESULTS.md").is_file()


def heading_ids(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings, as MkDocs (Python-Markdown's toc) makes them."""
    from markdown.extensions.toc import slugify

    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return {slugify(h.replace("`", ""), "-") for h in re.findall(r"^#+ (.+)$", text, re.M)}


def test_relative_links_resolve():
    """Every relative link of README.md and docs/*.md names an existing file, and an anchor into a
    Markdown file names one of its headings (the README is read in the repository, not on the site)."""
    checked = 0
    for page in [ROOT / "README.md", *DOCS.glob("*.md")]:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            assert path.is_file(), f"{page.name}: link to {target}"
            if anchor and path.suffix == ".md":
                assert anchor in heading_ids(path), f"{page.name}: no heading #{anchor} in {file}"
            checked += 1
    assert checked > 40


def test_readme_points_into_the_docs():
    readme = (ROOT / "README.md").read_text()
    for page in ("getting-started", "python-api", "methods", "task-families", "outputs", "extending"):
        assert f"](docs/{page}.md" in readme, page
    assert "<!-- results:" not in readme  # the tables live in docs/results.md


def test_every_builtin_has_a_row_in_the_docs():
    """The methods page lists every registered method, the task families page every family."""
    from bayesmeta.registry import families, methods

    for registry, page in ((methods, "methods.md"), (families, "task-families.md")):
        text = (DOCS / page).read_text()
        for name in registry.builtins():
            assert f"[`{name}`](options.md#{name})" in text, (page, name)


def test_every_cli_flag_is_documented():
    from bayesmeta.cli import _parser

    text = (DOCS / "getting-started.md").read_text()
    sub = next(a for a in _parser()._actions if a.dest == "command")
    for command, parser in sub.choices.items():
        assert f"bayesmeta {command}" in text, command
        for action in parser._actions:
            for flag in action.option_strings:
                assert flag in ("-h", "--help") or f"`{flag}" in text, (command, flag)


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


SHORT = (
    '"train.steps=2000"',
    '"train.steps=20", "train.meta_batch=4", "train.log_every=10", "train.eval_every=10", '
    '"train.checkpoint_every=10", "train.eval_tasks=10", "eval.tasks=10", "eval.batch=10"',
)


def test_python_api_examples_run(tmp_path, monkeypatch):
    """docs/python-api.md: the quickstart (the README's example) with the training shortened, then
    the fitted run predicts on a support set and re-evaluates."""
    code = example("quickstart")
    assert "bayesmeta.train" in code
    code = code.replace(
        '"train.steps=2000"',
        '"train.steps=100", "train.log_every=50", '
        '"train.eval_every=50", "train.checkpoint_every=50", "eval.tasks=20"',
    )
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "quickstart", "exec"), {})
    assert (tmp_path / "runs" / "example" / "inference.nc").is_file()
    code = example("open_run").replace("eval.tasks=100", "eval.tasks=20")
    scope: dict = {}
    exec(compile(code, "open_run", "exec"), scope)
    assert scope["dt"]["posterior_predictive"]["f"].shape == (1, 20, 100, 1)
    assert scope["metrics"]["eval_tasks"] == 20


def test_arrays_example_runs(tmp_path, monkeypatch):
    """docs/task-families.md: the `arrays` example, with the training shortened."""
    code = example("arrays").replace(*SHORT)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "arrays", "exec"), {})
    assert (tmp_path / "lines.npz").is_file() and (tmp_path / "runs" / "lines" / "metrics.json").is_file()


def test_tfds_images_example_runs(tmp_path, monkeypatch):
    """docs/task-families.md: the `tfds_images` example on the tiny dataset of
    tests/test_tfds_images.py in place of MNIST, with the training and the network shortened."""
    from tests.test_tfds_images import TinyDigits

    TinyDigits(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
    code = example("tfds_images")
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
    exec(compile(code, "tfds_images", "exec"), {})
    assert (tmp_path / "runs" / "mnist" / "metrics.json").is_file()
