"""The browser's model-backed API (lab runs, logit effects, nearest codes) against direct
computation on a tiny random model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from codebook_lens.analysis import (  # noqa: E402
    ablate_codes,
    code_logit_attribution,
    force_codes,
)
from codebook_lens.browse import create_app, load_browse_data  # noqa: E402
from codebook_lens.model import CodebookModel, codes_hook_name  # noqa: E402
from tests.integration.browse_helpers import tiny_dir  # noqa: E402

pytestmark = pytest.mark.bridge
ATTN, MLP = "blocks.0.attn.hook_z", "blocks.1.hook_mlp_out"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tiny_dir(tmp_path_factory.mktemp("lab") / "out")
    client = TestClient(create_app(load_browse_data(d)))
    return client, CodebookModel.load(d / "model").eval()


def lab(client, **body):
    r = client.post("/api/lab", json={"n_new": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_unpatched_run_matches_the_model(setup):
    client, cm = setup
    res = lab(client, prompt="10 3 1 4 1 5", top=11)
    toks = torch.tensor([[10, 3, 1, 4, 1, 5]])
    _, cache = cm.run_with_cache(toks)
    probs = torch.softmax(cm(toks)[0, -1].float(), -1)
    got = {it["id"]: it["prob"] for it in res["unpatched"]["next"]["items"]}
    assert got == pytest.approx({i: float(p) for i, p in enumerate(probs)}, abs=1e-5)
    assert res["unpatched"]["codes"][ATTN] == cache[codes_hook_name(ATTN)][0].tolist()
    assert res["unpatched"]["codes"][MLP] == cache[codes_hook_name(MLP)][0][:, None].tolist()
    assert res["patched"] == res["unpatched"]


def test_force_and_ablate_match_the_analysis_hooks(setup):
    client, cm = setup
    toks = torch.tensor([[10, 3, 1, 4, 1, 5]])
    iv = {"site": ATTN, "action": "force", "code": 9, "head": 2, "positions": [-1]}
    res = lab(client, prompt="10 3 1 4 1 5", interventions=[iv], top=11)
    hooked = cm.run_with_hooks(
        toks, fwd_hooks=[(codes_hook_name(ATTN), force_codes(9, positions=[5], heads=2))]
    )
    want = torch.softmax(hooked[0, -1].float(), -1)
    got = {it["id"]: it["prob"] for it in res["patched"]["next"]["items"]}
    assert got == pytest.approx({i: float(p) for i, p in enumerate(want)}, abs=1e-5)
    codes = res["patched"]["codes"][ATTN]

    def strip(rows):
        return [[[c for c in slot if c >= 0] for slot in row] for row in rows]

    assert 9 in codes[5][2]  # appended in a new slot, the k chosen codes stay
    assert strip(codes[:5]) == strip(res["unpatched"]["codes"][ATTN][:5])
    abl = lab(client, prompt="10 3 1 4", interventions=[{"site": MLP, "action": "ablate"}])
    assert all(c == -1 for row in abl["patched"]["codes"][MLP] for c in row[0])


def _sample(cm, ids, hooks, n_new, seed):
    """Sampling as the Lab documents it, step by step: no KV cache, the hooks on every step,
    one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.tensor([ids])
    for _ in range(n_new):
        logits = cm.run_with_hooks(seq, fwd_hooks=hooks)[0, -1].float()
        seq = torch.cat([seq, torch.multinomial(logits.softmax(-1), 1, generator=g)[None]], 1)
    return seq[0, len(ids) :].tolist()


def test_continuation_is_seeded_and_patched_differently(setup):
    client, cm = setup
    a = lab(client, prompt="10 1 2", n_new=12, seed=3)
    b = lab(client, prompt="10 1 2", n_new=12, seed=3)
    assert a["unpatched"]["continuation"] == b["unpatched"]["continuation"]
    assert a["unpatched"]["continuation"] == _sample(cm, [10, 1, 2], [], 12, 3)
    assert (
        lab(client, prompt="10 1 2", n_new=12, seed=4)["unpatched"]["continuation"]
        == (_sample(cm, [10, 1, 2], [], 12, 4))
        != a["unpatched"]["continuation"]
    )  # the seed matters
    # an intervention: the patched continuation is the one sampled with the same hooks (the
    # prompt position stays forced at every step), and the unpatched one is unchanged
    ivs = [
        {"site": ATTN, "action": "force", "code": 9, "head": 2, "positions": [-1]},
        {"site": MLP, "action": "ablate", "positions": [0, 1, 2]},
    ]
    hooks = [
        (codes_hook_name(ATTN), force_codes(9, positions=[2], heads=2)),
        (codes_hook_name(MLP), ablate_codes(None, positions=[0, 1, 2])),
    ]
    res = lab(client, prompt="10 1 2", interventions=ivs, n_new=12, seed=3)
    assert res["unpatched"]["continuation"] == a["unpatched"]["continuation"]
    assert res["patched"]["continuation"] == _sample(cm, [10, 1, 2], hooks, 12, 3)
    assert res["patched"]["continuation"] != res["unpatched"]["continuation"]
    capped = lab(client, prompt=" ".join(["1"] * 60), n_new=10)
    assert capped["n_new"] == 4 and len(capped["patched"]["continuation"]) == 4  # n_ctx = 64


def test_logit_effect_and_nearest_codes(setup):
    client, cm = setup
    e = client.get(f"/api/code/{ATTN}/1/4/effects").json()
    dla = code_logit_attribution(cm, ATTN, codes=[4])[1, 0]
    top = dla.topk(10)
    assert [t["id"] for t in e["logits"]["top"]] == top.indices.tolist()
    assert [t["value"] for t in e["logits"]["top"]] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert e["logits"]["bottom"][0]["value"] == pytest.approx(float(dla.min()), abs=1e-5)
    book = F.normalize(cm.codebooks[ATTN].codebook.detach()[1], dim=-1)
    sim = book @ book[4]
    sim[4] = -2
    assert [n["code"] for n in e["nearest"]] == sim.topk(10).indices.tolist()


@pytest.mark.parametrize(
    "body,msg",
    [
        ({"prompt": "a b"}, "token ids"),
        ({"prompt": "99"}, "token ids in [0, 11)"),
        ({"prompt": " ".join(["1"] * 70)}, "n_ctx"),
        ({"prompt": "1 2", "interventions": [{"site": "x", "action": "force", "code": 1}]}, "x"),
        ({"prompt": "1 2", "interventions": [{"site": ATTN, "action": "force"}]}, "needs a code"),
        ({"prompt": "1 2", "interventions": [{"site": ATTN, "action": "force", "code": 99}]},
         "out of range"),
        ({"prompt": "1 2", "interventions": [{"site": MLP, "action": "ablate", "head": 1}]},
         "no head axis"),
        ({"prompt": "1 2", "interventions": [{"site": ATTN, "action": "ablate", "positions": [5]}]},
         "positions"),
        ({"prompt": "1 2", "interventions": [{"site": ATTN, "action": "zap"}]}, "action"),
        ({"prompt": "1 2", "n_new": 1000}, "n_new"),
    ],
)  # fmt: skip
def test_bad_lab_requests_are_4xx(setup, body, msg):
    client, _ = setup
    r = client.post("/api/lab", json=body)
    assert 400 <= r.status_code < 500, r.text
    assert msg in r.json()["error"]


@pytest.mark.timeout(300)
def test_tokfsm_demo_output_is_browsable(tmp_path):
    from codebook_lens.fsm.demo import run_demo
    from codebook_lens.fsm.experiment import ExperimentConfig
    from codebook_lens.fsm.machine import FSM
    from codebook_lens.fsm.metrics import next_state_distribution

    out = tmp_path / "demo_out"
    run_demo(out, ExperimentConfig.small(), cache_dir=tmp_path / "cache", progress=False,
             log=lambda m: None)  # fmt: skip
    client = TestClient(create_app(load_browse_data(out)))
    o = client.get("/api/overview").json()
    assert o["kind"] == "fsm" and o["model"]["loaded"] and len(o["labels"]) == 20
    best = client.get("/api/search", params={"kind": "label", "q": "07"}).json()["items"][0]
    assert best["tp"] > 0
    cm, fsm = CodebookModel.load(out / "model").eval(), FSM.load(out / "fsm.json")
    res = lab(client, prompt="12 07", top=20)
    assert res["tokens"] == [fsm.bos, 1, 2, 0, 7]
    nxt = res["unpatched"]["next"]
    assert nxt["kind"] == "state" and nxt["last_state"] == 7
    assert nxt["successors"] == fsm.successors[7].tolist()
    want = next_state_distribution(cm, fsm, torch.tensor([res["tokens"]]))[0]
    got = {it["id"]: it["prob"] for it in nxt["items"]}
    assert got == pytest.approx({i: float(p) for i, p in enumerate(want)}, abs=1e-5)
    bad = client.post("/api/lab", json={"prompt": "1a"})
    assert bad.status_code == 400 and "digits" in bad.json()["error"]
