"""MkDocs hooks (mkdocs.yml `hooks:`): pages in docs/ may link to repository files outside it, such as
an experiment's RESULTS.md, as `../experiments/NAME/RESULTS.md`, which is right when the Markdown is
read in the repository. The site publishes each such file as it is under `repo/` and points the link
there, so the strict build still checks it: a link to a file that does not exist fails the build."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks")  # a warning here fails the strict build
OUTSIDE = re.compile(r"\]\(\.\./([^)#\s]+)")  # a Markdown link target leaving docs/


class RepoFile(File):
    """A repository file copied into the site as it is (a Markdown file is not rendered as a page)."""

    def is_documentation_page(self) -> bool:
        return False


def on_files(files, config):
    docs = Path(config.docs_dir)
    root = docs.parent.resolve()
    for page in sorted(docs.glob("*.md")):
        for target in OUTSIDE.findall(page.read_text()):
            path = (root / target).resolve()
            uri = f"repo/{target}"
            if path.is_file() and path.is_relative_to(root) and files.get_file_from_path(uri) is None:
                files.append(RepoFile.generated(config, uri, abs_src_path=str(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    for target in OUTSIDE.findall(markdown):
        if files.get_file_from_path(f"repo/{target}") is None:
            log.warning("%s links to ../%s, which is not a file of the repository", page.file.src_uri, target)
    return OUTSIDE.sub(r"](repo/\1", markdown)
