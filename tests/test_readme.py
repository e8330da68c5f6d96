"""The README's quickstart runs exactly as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(heading: str) -> str:
    text = README.read_text()
    section = text.split(f"## {heading}\n", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no python block under '## {heading}'"
    return match.group(1)


def test_quickstart_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = _block("Quickstart")
    namespace: dict = {}
    exec(compile(code, "README.md#quickstart", "exec"), namespace)
    assert (tmp_path / "my_codebooks" / "cfg.json").exists()
    assert namespace["codes"].dtype.is_floating_point is False
    assert not namespace["patched"].equal(namespace["logits"])
