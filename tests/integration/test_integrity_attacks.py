"""A CodebookModel checkpoint refuses what it does not hold: a missing, extra, swapped or foreign
tensor (base model or codebooks), an edited Hugging Face config, an unknown dtype; and a
low-precision base model comes back in its own dtype with the same logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from codebook_lens import CheckpointError, CodebookModel
from codebook_lens.atomic import data_path
from codebook_lens.io import MODEL_KIND
from tests.conftest import TINY, make_model

SITE = "blocks.0.hook_resid_post"


def _tokens():
    return torch.randint(0, TINY["d_vocab"], (2, 8), generator=torch.Generator().manual_seed(0))


def _trained(backend: str, seed: int, dtype: torch.dtype = torch.float32) -> CodebookModel:
    """A model whose weights differ from a fresh build (so a weight left at its initial value
    shows in the logits), with a codebook."""
    model = make_model(backend).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g).to(p.dtype))
    cm = CodebookModel(model)
    torch.manual_seed(seed)
    cm.add_codebook(SITE, n_codes=8, k=2, seed=seed)
    return cm


def _save(cm: CodebookModel, path: Path) -> Path:
    cm.save(path, include_model=True)
    return path


def _file(path: Path, name: str) -> Path:
    return data_path(path, MODEL_KIND) / name


def _edit(path: Path, name: str, edit) -> None:
    f = _file(path, name)
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f), metadata={"format": "codebook_lens"})


@pytest.fixture
def saved(backend, tmp_path):
    cm = _trained(backend, 1)
    return _save(cm, tmp_path / "a"), cm(_tokens()), backend


def test_intact_checkpoint_loads_with_the_same_logits(saved):
    path, logits, backend = saved
    assert torch.equal(CodebookModel.load(path, backend=backend)(_tokens()), logits)


@pytest.mark.parametrize("which", [0, 1, -1])
def test_missing_model_tensor_is_refused(saved, which):
    path, _, backend = saved
    keys = sorted(load_file(str(_file(path, "model.safetensors"))))
    key = [k for k in keys if "bias" in k or k.endswith(".b")][0] if which == 1 else keys[which]
    _edit(path, "model.safetensors", lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=rf"lacks tensor '{key}'"):
        CodebookModel.load(path, backend=backend)


def test_extra_model_tensor_is_refused(saved):
    path, _, backend = saved
    _edit(path, "model.safetensors", lambda t: t.update({"blocks.0.extra": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match="holds tensor 'blocks.0.extra'.*not recorded"):
        CodebookModel.load(path, backend=backend)


def test_model_tensor_from_another_checkpoint_is_refused(saved, tmp_path):
    path, _, backend = saved
    other = _save(_trained(backend, 2), tmp_path / "b")
    theirs = load_file(str(_file(other, "model.safetensors")))
    key = sorted(theirs)[3]
    _edit(path, "model.safetensors", lambda t: t.update({key: theirs[key]}))
    with pytest.raises(CheckpointError, match=rf"{key}.*does not match the SHA-256"):
        CodebookModel.load(path, backend=backend)


def test_two_model_tensors_swapped_are_refused(saved):
    path, _, backend = saved
    mine = load_file(str(_file(path, "model.safetensors")))
    a, b = [k for k in sorted(mine) if k.startswith("blocks.") and mine[k].dim() == 1][:2]
    assert mine[a].shape == mine[b].shape

    def swap(t):
        t[a], t[b] = t[b], t[a]

    _edit(path, "model.safetensors", swap)
    with pytest.raises(CheckpointError, match="does not match the SHA-256"):
        CodebookModel.load(path, backend=backend)


@pytest.mark.parametrize("name", ["model.safetensors", "codebooks.safetensors"])
def test_whole_foreign_data_file_is_refused(saved, tmp_path, name):
    path, _, backend = saved
    other = _save(_trained(backend, 2), tmp_path / "b")
    shutil.copy(_file(other, name), _file(path, name))
    with pytest.raises(CheckpointError, match=rf"{name}.*does not match the SHA-256"):
        CodebookModel.load(path, backend=backend)


@pytest.mark.parametrize("edit", ["swap", "extra", "missing_counts"])
def test_codebook_tensors_are_checked_against_the_record(saved, tmp_path, edit):
    path, _, backend = saved
    other = _save(_trained(backend, 2), tmp_path / "b")
    theirs = load_file(str(_file(other, "codebooks.safetensors")))
    change = {
        "swap": lambda t: t.update({f"{SITE}.codebook": theirs[f"{SITE}.codebook"]}),
        "extra": lambda t: t.update({"blocks.1.hook_resid_post.codebook": torch.zeros(1, 8, 32)}),
        "missing_counts": lambda t: t.pop(f"{SITE}.code_counts"),
    }[edit]
    _edit(path, "codebooks.safetensors", change)
    with pytest.raises(CheckpointError, match="codebooks.safetensors"):
        CodebookModel.load(path, make_model(backend))  # the codebooks alone, on a given model


@pytest.mark.parametrize("where", ["config", "record"])
def test_unknown_dtype_string_is_refused(saved, where):
    path, _, backend = saved
    head = path / "cfg.json"
    meta = json.loads(head.read_text())
    if where == "config":
        meta["model"]["config"]["dtype"] = "float128"
    else:
        meta["model"]["dtype"] = "float128"
    head.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="float128"):
        CodebookModel.load(path, backend=backend)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_base_model_dtype_round_trips_with_equal_logits(backend, tmp_path, dtype):
    cm = _trained(backend, 1, dtype)
    want = cm(_tokens())
    back = CodebookModel.load(_save(cm, tmp_path / "m"), backend=backend)
    assert {p.dtype for p in back.model.parameters()} == {dtype}
    got = back(_tokens())
    assert got.dtype == want.dtype
    assert torch.equal(got, want)


def test_removing_the_record_from_a_new_checkpoint_is_refused(saved):
    path, _, backend = saved
    head = path / "cfg.json"
    meta = json.loads(head.read_text())
    del meta["tensors"]
    head.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="'tensors'"):
        CodebookModel.load(path, backend=backend)


@pytest.fixture(scope="module")
def hf_saved(tmp_path_factory):
    """A Hugging Face GPT-2 (tiny, random, offline) booted as a bridge, saved with its model."""
    transformers = pytest.importorskip("transformers")
    from codebook_lens import boot_hf
    from tests.integration.test_hf_architectures import _tokenizer

    d = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_positions=32, n_embd=32, n_layer=2, n_head=4, vocab_size=40)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(d / "src")
    _tokenizer().save_pretrained(d / "src")
    cm = CodebookModel(boot_hf(d / "src"))
    cm.add_codebook(SITE, n_codes=8, k=2)
    cm.save(d / "ck", include_model=True)
    return d / "ck", cm(_tokens())


@pytest.mark.bridge
@pytest.mark.parametrize("edit", ["none", "config", "extra_file", "missing_file"])
def test_hugging_face_files_are_checked(hf_saved, tmp_path, edit):
    src, logits = hf_saved
    path = tmp_path / "ck"
    shutil.copytree(src, path)
    hf = _file(path, "hf_model")
    if edit == "none":
        assert torch.equal(CodebookModel.load(path, backend="bridge")(_tokens()), logits)
        return
    if edit == "config":  # same shapes, different numerics: only the record can tell
        cfg = json.loads((hf / "config.json").read_text())
        cfg["layer_norm_epsilon"] = 0.5
        (hf / "config.json").write_text(json.dumps(cfg))
    elif edit == "extra_file":
        (hf / "modeling_gpt2.py").write_text("raise SystemExit('never run')\n")
    else:
        (hf / "config.json").unlink()
    match = {"config": "config.json does not match the SHA-256", "extra_file":
             "holds hf_model/modeling_gpt2.py, which was not saved", "missing_file":
             "lacks hf_model/config.json"}[edit]  # fmt: skip
    with pytest.raises(CheckpointError, match=match):
        CodebookModel.load(path, backend="bridge")


@pytest.fixture(scope="module")
def saved_once(tmp_path_factory):
    cm = _trained("auto", 1)
    return _save(cm, tmp_path_factory.mktemp("fuzz") / "m"), cm(_tokens())


RECORD_JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-2, 40), st.text(max_size=4),
    st.sampled_from(["float16", "bfloat16", "float32", "int64", "torch.float32", "0" * 64]),
    st.lists(st.integers(-1, 40), max_size=4), st.dictionaries(st.text(max_size=3), st.none()),
)  # fmt: skip


@pytest.mark.bridge
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_the_record_in_cfg_json(saved_once, data):
    """Any change to a recorded dtype, shape or digest is refused (or, when it changes
    nothing, the checkpoint loads with the same logits); never another exception."""
    path, logits = saved_once
    head = path / "cfg.json"
    meta = json.loads(head.read_text())
    name = data.draw(st.sampled_from(sorted(meta["tensors"])))
    key = data.draw(st.sampled_from(sorted(meta["tensors"][name])))
    field = data.draw(st.sampled_from(["dtype", "shape", "sha256", None]))
    mutated = json.loads(json.dumps(meta))
    value = data.draw(RECORD_JUNK)
    if field is None:
        mutated["tensors"][name][key] = value
    else:
        mutated["tensors"][name][key][field] = value
    head.write_text(json.dumps(mutated))
    try:
        got = CodebookModel.load(path)(_tokens())
        assert mutated == meta and torch.equal(got, logits)
    except CheckpointError:
        assert mutated != meta
    finally:
        head.write_text(json.dumps(meta))
