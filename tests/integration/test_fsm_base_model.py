"""Integration tests for TokFSM with tiny random TransformerLens models (offline, CPU, seconds)."""

import math
from types import SimpleNamespace

import pytest
import torch

from codebook_lens.backends import backend_of, build_model, resolve_backend
from codebook_lens.fsm import (
    FSM,
    BaseTrainConfig,
    base_model_config,
    eval_set,
    evaluate_transition_accuracy,
    loss_floor,
    next_state_distribution,
    sample_continuations,
    sinusoidal_positions,
    train_base_model,
)

# A seconds-long base-model training setup (not the model config of tests/conftest.py: this one
# is a BaseTrainConfig, and the tests below assert its lr and warmup).
TINY_TRAIN = dict(
    n_layers=1,
    d_model=32,
    n_heads=2,
    d_mlp=64,
    n_ctx=33,
    walk_states=16,
    batch_size=16,
    lr=3e-3,
    warmup_steps=5,
    eval_prompts=8,
    eval_prompt_states=4,
    eval_new_states=4,
)


@pytest.fixture(scope="module")
def fsm():
    return FSM()


@pytest.fixture(scope="module")
def tiny_model(fsm):
    cfg = base_model_config(fsm, n_layers=1, d_model=32, n_heads=2, d_mlp=64, n_ctx=21, seed=3)
    return build_model(cfg)


class Wrapper(torch.nn.Module):
    """An object that wraps a HookedTransformer (as a CodebookModel does)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens):
        return self.model(tokens)


def test_base_model_config(fsm):
    cfg = SimpleNamespace(**base_model_config(fsm))
    d = BaseTrainConfig()
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_mlp, cfg.n_ctx) == (
        d.n_layers,
        d.d_model,
        d.n_heads,
        d.d_mlp,
        d.n_ctx,
    )
    assert cfg.d_vocab == 11 and cfg.d_head * cfg.n_heads == cfg.d_model
    assert cfg.act_fn == "gelu" and cfg.normalization_type == "LN"
    # the default context holds the default training walks and the evaluation sequences
    assert 1 + d.walk_states * fsm.n_digits <= cfg.n_ctx
    assert 1 + (d.eval_prompt_states + d.eval_new_states) * fsm.n_digits <= cfg.n_ctx
    with pytest.raises(ValueError, match="divisible"):
        base_model_config(fsm, d_model=30, n_heads=4)


def test_next_state_distribution_on_base_model(fsm, tiny_model):
    prompts = eval_set(fsm, 2, 3, seed=0)  # 7 tokens
    got = next_state_distribution(tiny_model, fsm, prompts)
    got_wrapped = next_state_distribution(Wrapper(tiny_model), fsm, prompts)
    torch.testing.assert_close(got, got_wrapped)
    expected = torch.zeros(2, 100)
    with torch.no_grad():
        logp1 = tiny_model(prompts)[:, -1, :10].log_softmax(-1)
        for a in range(10):
            seqs = torch.cat([prompts, torch.full((2, 1), a)], dim=1)
            logp2 = tiny_model(seqs)[:, -1, :10].log_softmax(-1)
            expected[:, a * 10 : a * 10 + 10] = (logp1[:, a : a + 1] + logp2).exp()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_sampling_on_hooked_transformer_and_wrapper(fsm, tiny_model):
    prompts = eval_set(fsm, 4, 2, seed=0)  # 5 tokens
    a = sample_continuations(tiny_model, prompts, 8, torch.Generator().manual_seed(0))
    b = sample_continuations(Wrapper(tiny_model), prompts, 8, torch.Generator().manual_seed(0))
    assert a.shape == (4, 21) and torch.equal(a, b)
    assert int(a[:, 1:].max()) < 10  # BOS masked
    with pytest.raises(ValueError, match="n_ctx is 21"):
        sample_continuations(Wrapper(tiny_model), prompts, 9)


def test_train_base_model_smoke(fsm):
    model, hist = train_base_model(
        fsm,
        steps=24,
        seed=0,
        progress=False,
        eval_every=12,
        train_cfg=BaseTrainConfig(**TINY_TRAIN, log_every=1),
    )
    assert backend_of(model) == resolve_backend() and not model.training
    assert model.cfg.n_ctx == 33 and model.cfg.n_layers == 1
    assert hist["step"] == list(range(1, 25))
    assert hist["eval_step"] == [12, 24]
    assert len(hist["transition_accuracy"]) == 2 and len(hist["time_s"]) == 2
    assert all(0.0 <= a <= 1.0 for a in hist["transition_accuracy"])
    first, last = sum(hist["loss"][:5]) / 5, sum(hist["loss"][-5:]) / 5
    assert first > 2.3  # ~ln(11) at init
    assert last < first - 0.1
    assert hist["loss_floor"] == [pytest.approx(loss_floor(fsm, 16))]
    assert hist["lr"][0] == pytest.approx(3e-3 / 5)  # warmup
    assert max(hist["lr"]) == pytest.approx(3e-3)
    # deterministic from the seed
    model2, hist2 = train_base_model(
        fsm, steps=3, seed=0, progress=False, train_cfg=BaseTrainConfig(**TINY_TRAIN, log_every=1)
    )
    assert hist2["loss"] == pytest.approx(hist["loss"][:3])


def test_train_base_model_errors(fsm):
    with pytest.raises(ValueError, match="n_ctx"):
        train_base_model(fsm, walk_states=17, train_cfg=BaseTrainConfig(**TINY_TRAIN))
    with pytest.raises(ValueError, match="divisible"):
        BaseTrainConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="steps"):
        BaseTrainConfig(steps=0)


def test_sinusoidal_positions():
    t = sinusoidal_positions(129, 128)
    assert t.shape == (129, 128)
    torch.testing.assert_close(t.pow(2).mean(1), torch.ones(129))
    parity = t[:, 0] / t[0, 0]  # period-2 column: (-1)**pos
    torch.testing.assert_close(parity, (-1.0) ** torch.arange(129.0))
    assert len(torch.unique(t.round(decimals=4), dim=0)) == 129  # positions are distinct
    assert sinusoidal_positions(5, 7).shape == (5, 7)


def test_pos_init_option(fsm):
    kw = dict(steps=1, seed=0, progress=False)
    m_sin, _ = train_base_model(fsm, train_cfg=BaseTrainConfig(**TINY_TRAIN), **kw)
    m_rnd, _ = train_base_model(
        fsm, train_cfg=BaseTrainConfig(**TINY_TRAIN, pos_init="random"), **kw
    )
    w = m_sin.pos_embed.W_pos.detach()
    # one AdamW step of lr/warmup moves each entry by <= lr: still the sinusoidal table
    expected = sinusoidal_positions(33, 32) * w.pow(2).mean().sqrt()
    torch.testing.assert_close(w, expected, atol=2e-3, rtol=0)
    assert not torch.allclose(w, m_rnd.pos_embed.W_pos.detach(), atol=1e-2)
    with pytest.raises(ValueError, match="pos_init"):
        BaseTrainConfig(pos_init="learned")


def test_loss_floor_values(fsm):
    assert loss_floor(fsm, 1) == pytest.approx(math.log(100) / 2)
    assert loss_floor(fsm, 64) == pytest.approx((math.log(100) + 63 * math.log(10)) / 128)


def test_evaluate_on_untrained_model_is_near_chance(fsm, tiny_model):
    acc, toks = evaluate_transition_accuracy(
        tiny_model, fsm, n_prompts=64, prompt_states=2, n_new_states=8, seed=0
    )
    assert toks.shape == (64, 21)
    assert acc < 0.3  # chance is 0.1


@pytest.mark.slow
def test_default_base_model_reaches_goal(fsm):
    """The shipped defaults: >= 0.97 transition accuracy, over the whole 64-state context."""
    model, hist = train_base_model(fsm, progress=False)
    assert hist["transition_accuracy"][-1] >= 0.97
    assert hist["eval_loss"][-1] < hist["loss_floor"][0] + 0.05
    acc_long, _ = evaluate_transition_accuracy(
        model, fsm, n_prompts=256, prompt_states=16, n_new_states=48, seed=7
    )
    assert acc_long >= 0.97
