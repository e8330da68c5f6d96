"""A run's base model: ``load_model`` boots tiny GPT-2, GPT-NeoX and Llama models saved with
``save_pretrained`` (and a BPE tokenizer trained with ``tokenizers``) on every backend the
installed transformer-lens has, with the Hugging Face model's own logits; bad names and
directories are one clear error, and never a download.

Tolerances: the raw bridge and the unprocessed HookedTransformer compute what ``transformers``
computes, in float32, up to summation order: max |logit difference| <= 1e-5 (measured about
1e-7). Weight processing centres the unembedding, which shifts each position's logits by a
constant, so processed models are compared on log-probabilities (measured about 1e-6).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from codebook_lens import CodebookModel
from codebook_lens.backends import backend_of, has_hooked_transformer
from codebook_lens.errors import BackendError
from codebook_lens.pipeline.models import ModelConfig, load_model, resolve_device
from tests.conftest import needs_hooked, needs_tl4
from tests.hf_fixtures import ARCHS, bpe_tokenizer, save_hf_model

transformers = pytest.importorskip("transformers")

ATOL = 1e-5


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer()


@pytest.fixture(scope="module")
def model_dirs(tok, tmp_path_factory):
    """arch -> directory. Named neutrally: transformer-lens 3.9 guesses a Llama config from a
    path containing 'llama' (see test_auto_falls_back_to_the_bridge)."""
    return {a: save_hf_model(tmp_path_factory.mktemp(f"m{i}"), a, tok) for i, a in enumerate(ARCHS)}


@pytest.fixture(scope="module")
def reference(model_dirs):
    """arch -> (tokens, logits of the transformers model itself)."""
    out = {}
    tokens = torch.randint(1, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    for arch, d in model_dirs.items():
        hf = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
        with torch.no_grad():
            out[arch] = (tokens, hf(tokens).logits)
    return out


def _load(**kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(ModelConfig(**kw))


def _check_booted(model, kind: str) -> None:
    assert backend_of(model) == kind
    assert not model.training
    assert model.tokenizer is not None and model.tokenizer.bos_token_id == 0


@pytest.mark.bridge
@pytest.mark.parametrize("compat", [False, True], ids=["raw", "compat"])
@pytest.mark.parametrize("arch", ARCHS)
def test_bridge_gives_the_transformers_logits(arch, compat, model_dirs, reference):
    model = _load(name=str(model_dirs[arch]), backend="bridge", compatibility_mode=compat)
    _check_booted(model, "bridge")
    assert bool(getattr(model, "compatibility_mode", False)) == compat
    tokens, want = reference[arch]
    with torch.no_grad():
        got = model(tokens)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@needs_hooked
@pytest.mark.parametrize("arch", ARCHS)
def test_hooked_gives_the_transformers_logits(arch, model_dirs, reference):
    model = _load(name=str(model_dirs[arch]), backend="hooked")
    _check_booted(model, "hooked")
    tokens, want = reference[arch]
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), want, atol=ATOL, rtol=0)


@pytest.mark.bridge
@pytest.mark.parametrize("arch", ARCHS)
def test_processed_weights_keep_the_probabilities(arch, model_dirs, reference):
    """auto: HookedTransformer's processing on 3.x, compatibility mode on the 4.x bridge."""
    model = _load(name=str(model_dirs[arch]), process_weights=True)
    tokens, want = reference[arch]
    with torch.no_grad():
        got = model(tokens)
    assert (got - want).abs().max() > 1e-4  # the logits did change ...
    torch.testing.assert_close(got.log_softmax(-1), want.log_softmax(-1), atol=ATOL, rtol=0)
    if backend_of(model) == "bridge":
        assert model.compatibility_mode


@pytest.mark.bridge
def test_auto_is_hooked_on_3x_and_the_bridge_on_4x(model_dirs):
    model = _load(name=str(model_dirs["gpt2"]))
    _check_booted(model, "hooked" if has_hooked_transformer() else "bridge")


@pytest.mark.bridge
def test_auto_falls_back_to_the_bridge(tok, tmp_path, reference):
    """A directory named like 'llama': transformer-lens 3.9 cannot read its config for a
    HookedTransformer, so "auto" boots the bridge (with a warning); 4.x boots it directly."""
    d = save_hf_model(tmp_path / "my-llama", "llama", tok)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_model(ModelConfig(name=str(d)))
    tokens, want = reference["llama"]
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), want, atol=ATOL, rtol=0)
    if backend_of(model) == "bridge" and has_hooked_transformer():
        assert any("booting it as a TransformerBridge" in str(w.message) for w in caught)


@pytest.mark.bridge
@pytest.mark.parametrize("compat", [False, True], ids=["raw", "compat"])
def test_a_loaded_model_saves_and_reloads_with_codebooks(compat, model_dirs, tmp_path):
    model = _load(name=str(model_dirs["neox"]), backend="bridge", compatibility_mode=compat)
    tokens = torch.randint(1, 300, (2, 10), generator=torch.Generator().manual_seed(1))
    cm = CodebookModel(model)
    cm.add_codebook("blocks.0.attn.hook_z", n_codes=16, k=2)
    cm.init_codebooks(tokens)
    cm.save(tmp_path / "ck", include_model=True)
    again = CodebookModel.load(tmp_path / "ck")
    assert torch.equal(again(tokens), cm(tokens))


@pytest.mark.bridge
def test_bfloat16(model_dirs, reference):
    model = _load(name=str(model_dirs["gpt2"]), dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    tokens, want = reference["gpt2"]
    with torch.no_grad():
        got = model(tokens).float()
    # bfloat16 keeps 8 bits of mantissa; these logits are below 1 in size (measured 3e-3)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=0)


def test_resolve_device():
    want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cpu" and torch.backends.mps.is_available():
        want = "mps"
    assert resolve_device("auto").type == want
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda:0")


# ------------------------------------------------------------------ errors
@pytest.mark.usefixtures("no_network")
def test_a_missing_local_path_is_not_looked_up_on_the_hub(tmp_path):
    for name in (str(tmp_path / "nothing"), "./runs/model", "runs/a/model", "~/no-model-here"):
        with pytest.raises(FileNotFoundError, match="never looked up on the Hub"):
            load_model(ModelConfig(name=name))


@pytest.mark.usefixtures("no_network")
def test_an_unknown_hub_name_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="cannot load 'someone/no-such-model' from the Hugging"):
        load_model(ModelConfig(name="someone/no-such-model"))


@pytest.mark.usefixtures("no_network")
def test_directories_that_are_not_models(tmp_path, tok):
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        load_model(ModelConfig(name=str(tmp_path / "file.bin")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no config.json; save the model there"):
        load_model(ModelConfig(name=str(tmp_path / "empty")))
    d = save_hf_model(tmp_path / "no-tok", "gpt2", tok, with_tokenizer=False)
    with pytest.raises(ValueError, match=r"no tokenizer .*tokenizer.save_pretrained"):
        load_model(ModelConfig(name=str(d)))


@needs_tl4
def test_hooked_on_transformer_lens_4_names_the_fix(model_dirs):
    with pytest.raises(BackendError, match="use backend='bridge'"):
        load_model(ModelConfig(name=str(model_dirs["gpt2"]), backend="hooked"))


@pytest.mark.usefixtures("user_view")
@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(name=""), "name is empty"),
        (dict(backend="hooked", compatibility_mode=True), "compatibility_mode is a Transfor"),
        (dict(backend="bridge", process_weights=True), "only in compatibility mode"),
        (dict(dtype="fp8"), "choose one of"),
        (dict(device="gpu"), "is not a torch device"),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{"name": "gpt2", **kw})


def test_config_fields_documented_and_round_trip():
    from codebook_lens.validation import field_docs

    assert all(doc.strip() for doc in field_docs(ModelConfig).values())
    cfg = ModelConfig(name="EleutherAI/pythia-70m", backend="bridge", dtype="bfloat16")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_load_model_turns_dropout_off(tmp_path):
    from codebook_lens.pipeline.models import ModelConfig, load_model
    from tests.hf_fixtures import save_hf_model

    d = save_hf_model(tmp_path / "gpt2", "gpt2")  # GPT2Config: dropout 0.1 everywhere
    model = load_model(ModelConfig(name=str(d))).train()
    tokens = torch.randint(1, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # train mode and still deterministic: no dropout mask is drawn
        assert torch.equal(model(tokens), model(tokens))
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
