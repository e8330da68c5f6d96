"""Bad input to ``codebook-lens train`` gets one clear error naming the fix, before anything is
written: the run directory is not created (or is left as it was)."""

from __future__ import annotations

from pathlib import Path

import pytest

from codebook_lens.cli import main
from codebook_lens.data import pydoc_texts
from tests.hf_fixtures import save_hf_model, save_texts

pytestmark = pytest.mark.bridge


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    model = save_hf_model(root / "gpt2", "gpt2", n_ctx=64)
    texts = [t.replace("\n", " ") for t in pydoc_texts()[:30]]
    return {
        "model": str(model),
        "data": save_texts(root / "data", texts, "jsonl"),
        "other_column": save_texts(root / "other", texts, "jsonl", column="content"),
        "tiny_data": save_texts(root / "tiny", ["just a few words"] * 3, "jsonl"),
    }


def _train(out: Path, capsys, **flags: str) -> str:
    argv = ["train", "--out", str(out), "--train.steps", "2", "--n-codes", "16", "--k", "1"]
    argv += ["--data.eval-tokens", "64", "--data.context-len", "16", "--data.batch-size", "2"]
    for flag, value in flags.items():
        argv += [f"--{flag.replace('__', '.').replace('_', '-')}", value]
    with pytest.raises(SystemExit) as e:
        main(argv)
    msg = str(e.value.code)
    assert msg.startswith("codebook-lens train: error: "), msg
    assert "Traceback" not in msg and "\n" not in msg.strip()
    return msg


CASES = {
    "unknown model directory": (
        dict(model__name="{tmp}/no_such_model", site="blocks.*.attn.hook_z"),
        ["no_such_model"],
    ),
    "pattern matching no hook": (
        dict(site="blocks.*.attn.hook_zz"),
        ["matches no hook point", "blocks.0.attn.hook_z"],
    ),
    "missing text column": (
        dict(data__path="{other_column}", site="blocks.*.attn.hook_z"),
        ["text", "content"],
    ),
    "context longer than the model's": (
        dict(data__context_len="128", site="blocks.*.attn.hook_z"),
        ["context_len=128", "n_ctx=64"],
    ),
    "fewer tokens than one batch": (
        dict(
            data__path="{tiny_data}",
            data__eval_path="{data}",
            data__batch_size="64",
            site="blocks.*.attn.hook_z",
        ),
        ["fewer than one batch"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_error_and_writes_nothing(case, hub, tmp_path, capsys):
    flags, needles = CASES[case]
    values = {"model__name": hub["model"], "data__path": hub["data"], **flags}
    values = {k: v.format(tmp=tmp_path, **hub) for k, v in values.items()}
    out = tmp_path / "run"
    msg = _train(out, capsys, **values)
    for needle in needles:
        assert needle in msg, (needle, msg)
    assert not out.exists()  # refused before the run directory was made


def test_a_directory_holding_something_else_is_refused_and_kept(hub, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    msg = _train(out, capsys, model__name=hub["model"], data__path=hub["data"],
                 site="blocks.*.attn.hook_z")  # fmt: skip
    assert "holds no run" in msg
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"


def test_a_config_file_error_names_the_file(hub, tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(
        f'[model]\nname = "{hub["model"]}"\n[data]\npath = "{hub["data"]}"\n'
        '[[sites]]\npattern = "blocks.*.attn.hook_z"\nn_codes = 16\nsimlarity = "dot"\n'
    )
    with pytest.raises(SystemExit) as e:
        main(["train", str(cfg), "--out", str(tmp_path / "run")])
    msg = str(e.value.code)
    assert str(cfg) in msg and "Did you mean 'similarity'" in msg
