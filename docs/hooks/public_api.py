"""MkDocs hook: the build fails on an undocumented public name.

The public names are those in the ``__all__`` of each package of codebook_lens (what the API
reference renders). Each must have a docstring (dunders such as ``__version__`` excepted), and
each package must have a page in docs/api/ that renders it (``::: codebook_lens.<package>``).
The package is read from source with griffe, as mkdocstrings reads it, so nothing is imported
(codebook_lens.saelens needs SAELens, which only the transformer-lens 3 venv has). A name that
only exists at run time (a module ``__getattr__``), or that a submodule of the same name hides,
is invisible there, so its package's page must render it from the module that defines it
(``::: codebook_lens.viz.browser.check_page``).

Run it alone: ``python docs/hooks/public_api.py`` prints the problems and exits 1 if any.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import griffe
from mkdocs.exceptions import PluginError

__all__ = ["api_pages", "on_pre_build", "undocumented"]

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "codebook_lens"


def _packages(mod: griffe.Module) -> list[griffe.Module]:
    out = [mod] if mod.is_init_module and mod.exports is not None else []
    for sub in mod.members.values():
        if not sub.is_alias and sub.is_module:  # not a module imported from elsewhere
            out += _packages(sub)
    return out


def _is_module(root: griffe.Module, path: str) -> bool:
    try:
        return root.modules_collection[path].is_module
    except (KeyError, griffe.AliasResolutionError):
        return False  # mkdocstrings fails the build on an identifier it cannot find


def _problem(package: griffe.Module, name: str, root: griffe.Module, page: str) -> str | None:
    """What is wrong with the public ``name`` of ``package`` (rendered by ``page``), or None."""
    try:
        obj = package[name]
        obj = obj.final_target if obj.is_alias else obj
    except griffe.AliasResolutionError as e:
        return f"imported from {e.alias.target_path}, which does not exist"
    except KeyError:
        obj = None
    # Two kinds of names mkdocstrings cannot render from the package: one provided at run time
    # (a module __getattr__), and one whose submodule of the same name hides the imported
    # object from static analysis (export.logit_extremes). The page renders them one by one.
    if obj is None or obj.is_module:
        shown = [line[4:].strip() for line in page.splitlines() if line.startswith("::: ")]
        path = next((p for p in shown if p.endswith(f".{name}") and not _is_module(root, p)), None)
        if path is None:
            why = "provided at run time" if obj is None else "hidden by the submodule " + obj.path
            return (
                f"{why}, so mkdocstrings cannot see it: render it on the package's docs/api "
                f"page with '::: <module that defines it>.{name}' (or rename the submodule)"
            )
        obj = root.modules_collection[path]
    return None if obj.docstring and obj.docstring.value.strip() else "no docstring"


def api_pages(api_dir: Path) -> dict[str, str]:
    """Package -> the text of the docs/api page that renders it with ``::: package``."""
    out = {}
    for page in sorted(api_dir.glob("*.md")):
        text = page.read_text()
        for line in text.splitlines():
            if line.startswith("::: "):
                out[line[4:].strip()] = text
    return out


def undocumented(root_dir: Path = ROOT) -> list[str]:
    """Every public name without a docstring, and every package without an API page."""
    root = griffe.load(PACKAGE, search_paths=[str(root_dir)], resolve_aliases=False)
    pages = api_pages(root_dir / "docs" / "api")
    problems = []
    for package in _packages(root):
        if package.path not in pages:
            problems.append(f"{package.path}: no page in docs/api/ has '::: {package.path}'")
        page = pages.get(package.path, "")
        for name in package.exports:
            name = name if isinstance(name, str) else name.name
            if not name.startswith("__") and (problem := _problem(package, name, root, page)):
                problems.append(f"{package.path}.{name}: {problem}")
    return problems


def on_pre_build(config: Any) -> None:
    """Fail the build when a public name is undocumented."""
    problems = undocumented()
    if problems:
        raise PluginError(
            "public names without documentation (add a docstring, or an API page that renders "
            "the package):\n  " + "\n  ".join(problems)
        )


if __name__ == "__main__":
    found = undocumented()
    print("\n".join(found) or "every public name is documented")
    sys.exit(1 if found else 0)
