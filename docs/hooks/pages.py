"""MkDocs hook: pages built from files outside docs/, and links that work on GitHub and here.

- Home is README.md, the tutorials' index is tutorials/README.md, and each tutorial
  ``tutorials/NN_name.py`` (jupytext percent format, the source of its ``.ipynb``) is rendered
  as a page of its Markdown cells and code blocks, with its notebook beside it for download.
  They are read at build time, never copied into docs/.
- The Markdown files link to each other by their paths in the repository (README.md links to
  ``docs/lm.md``, docs/results/lm.md to ``../../README.md``). Every relative link is resolved
  from the page's repository path and rewritten to the site page built from that file; a link
  to a file that is on no page is left as it is, so ``mkdocs build --strict`` reports it.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

import jupytext
from mkdocs.structure.files import File, Files

__all__ = ["on_files", "on_page_markdown", "tutorial_markdown"]

ROOT = Path(__file__).resolve().parents[2]
TUTORIALS = "tutorials"
# site page -> the repository file it is built from (pages under docs/ are docs/<page>)
SOURCES: dict[str, str] = {}
# repository file -> the site page that shows it (a tutorial's notebook: its page)
PAGES: dict[str, str] = {}
LINK = re.compile(r"(\]\()(<?)([^)\s>#]+)(#[^)\s>]*)?(>?)")


def tutorial_markdown(source: str, notebook: str) -> str:
    """The page of one jupytext percent-format tutorial: its Markdown cells as they are, its
    code cells as Python blocks (the notebooks are committed without outputs, so this is all a
    notebook renderer would show), and a download link to ``notebook``."""
    nb = jupytext.reads(source, fmt="py:percent")
    cells = [
        c.source if c.cell_type == "markdown" else f"```python\n{c.source}\n```"
        for c in nb.cells
        if c.source.strip()
    ]
    head = (
        f'!!! note "Run it"\n    <a href="{notebook}" download>Download the notebook</a>, or run '
        f"`python {TUTORIALS}/{notebook.removesuffix('.ipynb')}.py` from a clone "
        "(`CODEBOOK_LENS_SMALL=1` for the seconds-long size).\n"
    )
    return cells[0] + "\n\n" + head + "\n\n" + "\n\n".join(cells[1:]) + "\n"


def _add(files: Files, config: Any, page: str, source: str, content: str) -> None:
    SOURCES[page] = source
    PAGES[source] = page
    files.append(File.generated(config, page, content=content))


def on_files(files: Files, config: Any) -> Files:
    """Add Home, the tutorials' index and one page (and notebook) per tutorial."""
    _add(files, config, "index.md", "README.md", (ROOT / "README.md").read_text())
    readme = f"{TUTORIALS}/README.md"
    _add(files, config, f"{TUTORIALS}/index.md", readme, (ROOT / readme).read_text())
    for script in sorted((ROOT / TUTORIALS).glob("[0-9][0-9]_*.py")):
        notebook = script.with_suffix(".ipynb")
        page = f"{TUTORIALS}/{script.stem}.md"
        _add(
            files,
            config,
            page,
            f"{TUTORIALS}/{script.name}",
            tutorial_markdown(script.read_text(), notebook.name),
        )
        PAGES[f"{TUTORIALS}/{notebook.name}"] = page
        files.append(
            File.generated(config, f"{TUTORIALS}/{notebook.name}", abs_src_path=str(notebook))
        )
    return files


def _site_page(repo_path: str) -> str | None:
    """The site file built from ``repo_path``, or None when no page is."""
    if repo_path in PAGES:
        return PAGES[repo_path]
    if repo_path.startswith("docs/") and (ROOT / repo_path).is_file():
        return repo_path.removeprefix("docs/")
    return None


def _rewrite(line: str, source_dir: str, page_dir: str) -> str:
    def one(m: re.Match[str]) -> str:
        target = m.group(3)
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("/"):
            return m.group(0)  # a URL or an absolute path: not a repository file
        site = _site_page(posixpath.normpath(posixpath.join(source_dir, target)))
        if site is None:
            return m.group(0)
        new = posixpath.relpath(site, page_dir or ".")
        return f"{m.group(1)}{m.group(2)}{new}{m.group(4) or ''}{m.group(5)}"

    return LINK.sub(one, line)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Rewrite the page's relative links from repository paths to site pages (not inside code
    blocks)."""
    uri = page.file.src_uri
    source_dir = posixpath.dirname(SOURCES.get(uri, f"docs/{uri}"))
    page_dir = posixpath.dirname(uri)
    out, fence = [], None
    for line in markdown.split("\n"):
        if m := re.match(r"\s*(```+|~~~+)", line):
            fence = None if fence and m.group(1).startswith(fence) else (fence or m.group(1))
        out.append(line if fence else _rewrite(line, source_dir, page_dir))
    return "\n".join(out)
