"""The README's code runs: the quickstart exactly as written, the own-model script and run
config on a tiny local model in place of the Hub names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from codebook_lens import CodebookModel
from codebook_lens.data import pydoc_texts
from codebook_lens.pipeline.config import RunConfig, load_config_file
from codebook_lens.pipeline.train import train_run

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


def _section_block(heading: str, lang: str) -> str:
    section = README.read_text().split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(rf"```{lang}\n(.*?)```", section, re.S)
    assert match, f"no {lang} block under '## {heading}'"
    return match.group(1)


@pytest.fixture(scope="module")
def local_hub(tmp_path_factory):
    """A tiny GPT-NeoX saved like a Hub model and a JSON-lines corpus, in place of the README's
    Hub names (nothing is downloaded in tests)."""
    from tests.hf_fixtures import save_hf_model, save_texts

    root = tmp_path_factory.mktemp("hub")
    model = save_hf_model(root / "pythia", "neox")
    texts = [t.replace("\n", " ") for t in pydoc_texts()[:30]]
    return str(model), save_texts(root / "data", texts, "jsonl")


SHRINK = {  # the README's sizes -> a tiny model's (same code path, seconds on a CPU)
    "n_codes=10_000": "n_codes=64",
    "steps=20_000": "steps=3",
    "block_len=256": "block_len=32",
    "batch_size=64": "batch_size=4",
    "checkpoint_every=500": "checkpoint_every=2",
}


def test_own_model_script_runs_on_a_local_model(local_hub, tmp_path, monkeypatch):
    model_dir, data = local_hub
    code = _section_block("Using your own model", "python")
    code = code.replace('"EleutherAI/pythia-70m-deduped"', repr(model_dir))
    code = code.replace(
        'datasets.load_dataset("roneneldan/TinyStories", split="train", streaming=True)',
        f'datasets.load_dataset("json", data_files={data!r}, split="train", streaming=True)',
    )
    for old, new in SHRINK.items():
        assert old in code, old
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md#own-model", "exec"), namespace)
    cm = namespace["cm"]
    reloaded = CodebookModel.load(tmp_path / "pythia70m_codebooks")
    tokens = torch.randint(1, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(reloaded(tokens), cm(tokens))
    assert (tmp_path / "ckpt" / "checkpoint" / "state.json").exists()


def test_own_model_run_config_runs(local_hub, tmp_path):
    model_dir, data = local_hub
    text = _section_block("Using your own model", "toml")
    (tmp_path / "run.toml").write_text(text)
    cfg = RunConfig.from_dict(load_config_file(tmp_path / "run.toml"))  # valid as written
    assert [g.pattern for g in cfg.sites] == ["blocks.*.attn.hook_z"] and cfg.train.freeze_model
    text = text.replace('"EleutherAI/pythia-70m-deduped"', repr(model_dir))
    text = text.replace('"roneneldan/TinyStories"', repr(data))
    for old, new in {"256": "32", "= 32\n": "= 4\n", "10000": "64", "20000": "3"}.items():
        text = text.replace(old, new)
    (tmp_path / "tiny.toml").write_text(text)
    cfg = RunConfig.from_dict(
        {**load_config_file(tmp_path / "tiny.toml"), "out": str(tmp_path / "run")}
    )
    cfg.data.eval_tokens, cfg.data.eval_fraction = 256, 0.2
    run = train_run(cfg)
    assert run.sites == ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]
    saved = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert saved["all"]["ce_codebook"] == pytest.approx(run.evaluation.all["ce_codebook"])
