"""The README's quickstart runs exactly as written."""

from __future__ import annotations

import inspect
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


def test_own_model_snippet_names_exist():
    # the snippet downloads a model and a dataset, so only its imports and config run here
    code = _block("Using your own model")
    imports = "\n".join(line for line in code.splitlines() if line.startswith(("from ", "import ")))
    namespace: dict = {}
    exec(compile(imports, "README.md#own-model", "exec"), namespace)
    cfg = namespace["TrainConfig"](
        steps=20_000, lr=1e-4, codebook_lr=1e-3, checkpoint_dir="ckpt", checkpoint_every=500
    )
    assert cfg.codebook_lr == 1e-3
    assert "block_len" in inspect.signature(namespace["BlockStream"]).parameters
