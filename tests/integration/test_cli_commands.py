"""The TokFSM step commands, ``lm-demo`` and ``browse`` as a user runs them: the installed
``codebook-lens`` script in a subprocess, at the tiny (``--small``) sizes, checked against the
files it writes and the numbers it prints, recomputed here from those files.

``fsm train-base`` -> ``fsm train-codebooks`` -> ``fsm analyze`` run once per module (each step
reads the previous one's directory); ``browse`` serves a store with ``--store --model`` and an
``lm-demo`` output directory on a free loopback port.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from codebook_lens import CodebookModel
from codebook_lens.analysis import CodeStore, collect_codes
from codebook_lens.fsm import FSM, eval_set
from codebook_lens.fsm.experiment import (
    ExperimentConfig,
    interventions,
    state_recovery,
    transition_accuracy_of,
)
from tests.conftest import offline_env

ROOT = Path(__file__).resolve().parents[2]
ENV = offline_env(TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore::DeprecationWarning")


def _command() -> list[str]:
    """The ``codebook-lens`` entry point installed next to this Python (as a user calls it);
    ``python -m codebook_lens.cli`` where the script is not installed."""
    script = shutil.which("codebook-lens", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "codebook_lens.cli"]


def cli(*args: str, cwd: Path) -> str:
    """Run ``codebook-lens ARGS``; its stdout (fails with both streams on a non-zero exit)."""
    proc = subprocess.run(
        [*_command(), *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"codebook-lens {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def table(stdout: str) -> dict[str, str]:
    """The ``metric  value`` rows of a printed table."""
    rows = {}
    for line in stdout.splitlines():
        parts = re.split(r"\s{2,}", line.strip())
        if len(parts) == 2 and not set(parts[1]) <= {"-"}:
            rows[parts[0]] = parts[1]
    return rows


@pytest.fixture(scope="module")
def fsm_steps(tmp_path_factory) -> dict[str, Any]:
    """The three TokFSM step commands, run in order at the small size."""
    d = tmp_path_factory.mktemp("fsm_cli")
    out = {"dir": d}
    out["train-base"] = cli(
        "fsm", "train-base", "--out", "base", "--small", "--no-progress", "--cache-dir", "cache",
        cwd=d,
    )  # fmt: skip
    out["train-codebooks"] = cli("fsm", "train-codebooks", "--base", "base", "--out", "cb", cwd=d)
    out["analyze"] = cli(
        "fsm", "analyze", "--model", "cb", "--base", "base", "--out", "analysis", cwd=d
    )
    return out


def _small_cfg() -> ExperimentConfig:
    cfg = ExperimentConfig.small()
    cfg.train.progress = False  # what --no-progress changes
    return cfg


def test_fsm_train_base(fsm_steps):
    d = fsm_steps["dir"] / "base"
    cfg = ExperimentConfig.from_dict(json.loads((d / "experiment.json").read_text()))
    assert cfg.to_dict() == _small_cfg().to_dict()
    fsm = FSM.load(d / "fsm.json")
    assert fsm == FSM(cfg.n_states, cfg.n_edges, seed=cfg.fsm_seed)
    base = CodebookModel.load(d / "base").detach()
    assert base.cfg.n_layers == cfg.base.n_layers and base.cfg.d_model == cfg.base.d_model
    # the printed accuracy is the saved model's (sampling is seeded)
    printed = table(fsm_steps["train-base"])
    acc, _ = transition_accuracy_of(base, fsm, cfg)
    assert printed["base transition accuracy"] == f"{acc:.3f}"
    assert printed["cached"] == "False"
    # the base model learnt: held-out loss 1.42 (4.3) / 1.43 (3.9) measured; a uniform guess
    # over the 11 tokens gives 2.40 and knowing only the state format 1.50
    walks = eval_set(fsm, 64, cfg.walk_states, seed=5)
    with torch.no_grad():
        logits = base(walks)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), walks[:, 1:].flatten())
    assert float(loss) < 1.6
    assert len(list((fsm_steps["dir"] / "cache").glob("tokfsm-base-*"))) == 1  # cached for reuse


def test_fsm_train_codebooks(fsm_steps):
    d, base_dir = fsm_steps["dir"] / "cb", fsm_steps["dir"] / "base"
    cfg = ExperimentConfig.from_dict(json.loads((d / "experiment.json").read_text()))
    assert cfg.to_dict() == _small_cfg().to_dict()
    fsm = FSM.load(d / "fsm.json")
    assert fsm == FSM.load(base_dir / "fsm.json")
    cm = CodebookModel.load(d / "model")
    assert cm.sites == ["blocks.0.attn.hook_z", "blocks.0.hook_mlp_out"]
    assert [cm.codebooks[s].cfg.n_codes for s in cm.sites] == [32, 32]
    history = json.loads((d / "history.json").read_text())
    assert [r["step"] for r in history] == [10, 20, 30]
    assert all(r["recon"] > 0 and torch.isfinite(torch.tensor(r["loss"])) for r in history)
    acc, _ = transition_accuracy_of(cm.eval(), fsm, cfg)
    assert table(fsm_steps["train-codebooks"])["transition accuracy"] == f"{acc:.3f}"
    # the base model was finetuned along with the codes (at a third of the codes' rate)
    base = CodebookModel.load(base_dir / "base").detach()
    ours, theirs = cm.model.state_dict(), base.state_dict()
    assert ours.keys() == theirs.keys()
    assert any(not torch.equal(ours[k], theirs[k]) for k in theirs)


def test_fsm_analyze(fsm_steps):
    """analysis.json holds what the Python API computes on the saved models (the API is checked
    against loop references in test_fsm_experiment.py and test_convert.py), and the printed
    table shows its numbers."""
    root = fsm_steps["dir"]
    res = json.loads((root / "analysis" / "analysis.json").read_text())
    cfg = ExperimentConfig.from_dict(json.loads((root / "cb" / "experiment.json").read_text()))
    fsm = FSM.load(root / "cb" / "fsm.json")
    cm = CodebookModel.load(root / "cb" / "model")
    base = CodebookModel.load(root / "base" / "base").detach()
    rec = state_recovery(cm, base, fsm, cfg)
    itv = interventions(cm, fsm, cfg)
    want = json.loads(json.dumps({"recovery": rec.metrics(), "intervention": itv}))
    assert res["recovery"]["states_recovered"] == want["recovery"]["states_recovered"]
    assert res["recovery"]["best_code"] == want["recovery"]["best_code"]
    for key in ("mean_best_code_precision", "mean_best_neuron_precision"):
        assert res["recovery"][key] == pytest.approx(want["recovery"][key], abs=1e-6), key
    assert res["intervention"]["n_interventions"] == fsm.n_states * cfg.intervention_prompts
    for name, r in want["intervention"]["per_site_set"].items():
        got = res["intervention"]["per_site_set"][name]
        assert got["success_rate"] == pytest.approx(r["success_rate"], abs=1e-6), name
        assert got["jsd"] == pytest.approx(r["jsd"], abs=1e-5), name
    printed = table(fsm_steps["analyze"])
    assert printed["states recovered"] == f"{rec.states_recovered} / {rec.states_present}"
    assert printed["mean best-code precision"] == f"{rec.mean_best_code_precision:.3f}"
    assert printed["intervention success (all sites)"] == f"{itv['success_rate']:.3f}"


# ---------------------------------------------------------------------------- browse
class Served:
    """``codebook-lens browse ARGS`` on a free loopback port; JSON GET and POST."""

    def __init__(self, *args: str, cwd: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [*_command(), "browse", *args, "--port", str(self.port)],
            cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    def __enter__(self) -> Served:
        deadline = time.monotonic() + 300
        while True:
            assert self.proc.poll() is None, self.proc.communicate()
            try:
                self.overview = self.get("/api/overview")
                return self
            except OSError:
                assert time.monotonic() < deadline, "the browser did not start"
                time.sleep(0.3)

    def __exit__(self, *exc: Any) -> None:
        self.proc.terminate()
        self.proc.communicate(timeout=30)

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=60) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict) -> Any:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())


def test_browse_store_and_model(fsm_steps, tmp_path):
    """``browse DIR --store S --model M``: the overview counts the store's codes, a code page
    counts its firings, and the Lab runs the model."""
    fsm = FSM.load(fsm_steps["dir"] / "cb" / "fsm.json")
    model_dir = fsm_steps["dir"] / "cb" / "model"
    cm = CodebookModel.load(model_dir).eval()
    tokens = eval_set(fsm, 12, 8, seed=11)
    collect_codes(cm, tokens, progress=False).save(tmp_path / "store")
    store = CodeStore.load(tmp_path / "store")
    (tmp_path / "dir").mkdir()
    args = ("dir", "--store", "store", "--model", str(model_dir))
    with Served(*args, cwd=tmp_path) as srv:
        o = srv.overview
        assert (o["n_seq"], o["seq_len"]) == tuple(tokens.shape)
        assert [s["site"] for s in o["sites"]] == cm.sites
        per_head = {}  # [seq, pos, head, k] at every site
        for s in o["sites"]:
            c = store.get(s["site"])
            per_head[s["site"]] = c = c if c.dim() == 4 else c[:, :, None]
            used = sum(len(torch.unique(c[:, :, h][c[:, :, h] >= 0])) for h in range(c.shape[2]))
            assert s["used"] == used, s["site"]
        assert o["model"]["loaded"] and set(o["model"]["codebooks"]) == set(cm.sites)
        site = "blocks.0.hook_mlp_out"
        code = int(per_head[site][0, 3, 0, 0])
        page = srv.get(f"/api/code/{site}/0/{code}")
        assert page["count"] == int((per_head[site][:, :, 0] == code).any(-1).sum())
        ids = tokens[0, :5].tolist()
        res = srv.post("/api/lab", {"prompt": " ".join(map(str, ids)), "n_new": 0, "top": 11})
    with torch.no_grad():
        probs = torch.softmax(cm(torch.tensor([ids]))[0, -1].float(), -1)
    got = {it["id"]: it["prob"] for it in res["unpatched"]["next"]["items"]}
    assert got == pytest.approx({i: float(p) for i, p in enumerate(probs)}, abs=1e-5)


# ---------------------------------------------------------------------------- lm-demo
LM_FLAGS = (
    "--n-train-stories", "800", "--n-eval-stories", "150", "--base-steps", "20",
    "--codebook-steps", "10", "--n-samples", "4", "--n-baseline", "8", "--max-new-tokens", "12",
)  # fmt: skip


def test_lm_demo_small_and_browse_its_output(tmp_path):
    """``lm-demo --small`` (shrunk further with config flags) writes its files and numbers;
    ``browse`` serves its directory with the topic labels and the Lab on its model."""
    from codebook_lens.data import pack_labelled_blocks
    from codebook_lens.lm import (
        TOPICS,
        StoryConfig,
        generate_stories,
        load_tokenizer,
        story_token_labels,
    )

    stdout = cli("lm-demo", "--out", "lm", "--small", "--no-progress", *LM_FLAGS, cwd=tmp_path)
    out = tmp_path / "lm"
    assert {p.name for p in out.iterdir()} >= {
        "metrics.json", "report.md", "tokenizer", "codebook_model", "browse",
    }  # fmt: skip
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["n_train_stories"] == 800 and m["config"]["base_steps"] == 20
    loss = m["loss"]
    # measured at these sizes: base 3.58 (4.3) / 3.67 (3.9), uniform over 512 tokens 6.24
    assert loss["base"] < 5.0
    assert loss["codebooks_after_finetuning"] < loss["codebooks_at_attach"]
    assert loss["relative_increase"] <= 0.10
    assert table(stdout)["loss_base"] == f"{m['summary']['loss_base']:.4g}"
    # the reported loss is the saved model's cross-entropy on the held-out stories
    cfg = m["config"]
    tok = load_tokenizer(out / "tokenizer")
    stories = generate_stories(cfg["n_eval_stories"], StoryConfig(), seed=cfg["seed"] + 10_000)
    ids, labels = story_token_labels(tok, stories)
    blocks, _ = pack_labelled_blocks(
        ids, labels, cfg["block_len"], tok.bos_token_id, tok.eos_token_id
    )
    cm = CodebookModel.load(out / "codebook_model").eval()
    with torch.no_grad():
        logits = cm(blocks)
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), blocks[:, 1:].flatten())
    assert float(ce) == pytest.approx(loss["codebooks_after_finetuning"], abs=1e-5)
    prompt = "Once upon a time, there was a dragon"
    with Served("lm", cwd=tmp_path) as srv:
        o = srv.overview
        assert o["kind"] == "lm" and o["labels"] == [*TOPICS, "generic"]
        assert (o["n_seq"], o["seq_len"]) == tuple(blocks.shape)
        assert o["metrics"]["loss.base"] == pytest.approx(loss["base"])
        res = srv.post("/api/lab", {"prompt": prompt, "n_new": 0, "top": 5})
    want = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    assert res["tokens"] == want
    with torch.no_grad():
        probs = torch.softmax(cm(torch.tensor([want]))[0, -1].float(), -1)
    top = probs.topk(5)
    assert [it["id"] for it in res["unpatched"]["next"]["items"]] == top.indices.tolist()
    got = [it["prob"] for it in res["unpatched"]["next"]["items"]]
    assert got == pytest.approx(top.values.tolist(), abs=1e-5)


# ---------------------------------------------------------------------------- convert
def test_convert_then_browse_the_converted_model(tmp_path):
    """``convert`` writes a model that loads alone and gives the reference's logits (within the
    README's 1e-7); ``browse --store --model`` runs the Lab on it."""
    import numpy as np

    fixture = ROOT / "tests" / "fixtures" / "codebook_features" / "neox_ip_k3"
    args = [str(fixture / "checkpoint"), "converted", "--base", str(fixture / "base")]
    stdout = cli("convert", *args, cwd=tmp_path)
    assert "blocks.1.hook_mlp_out" in stdout
    cm = CodebookModel.load(tmp_path / "converted").eval()
    exp = np.load(fixture / "expected.npz", allow_pickle=False)
    tokens = torch.from_numpy(exp["tokens"])
    with torch.no_grad():
        logits = cm(tokens)
    assert (logits - torch.from_numpy(exp["logits"])).abs().max().item() < 1e-7
    collect_codes(cm, tokens, progress=False).save(tmp_path / "store")
    (tmp_path / "dir").mkdir()
    model = str(tmp_path / "converted")
    with Served("dir", "--store", "store", "--model", model, cwd=tmp_path) as srv:
        assert srv.overview["model"]["loaded"] and srv.overview["n_seq"] == tokens.shape[0]
        ids = tokens[0, :6].tolist()
        res = srv.post("/api/lab", {"prompt": " ".join(map(str, ids)), "n_new": 0, "top": 5})
    assert res["tokens"] == ids  # no tokenizer in the store's DIR: the prompt is token ids
    with torch.no_grad():
        top = torch.softmax(cm(torch.tensor([ids]))[0, -1].float(), -1).topk(5)
    assert [it["id"] for it in res["unpatched"]["next"]["items"]] == top.indices.tolist()
    got = [it["prob"] for it in res["unpatched"]["next"]["items"]]
    assert got == pytest.approx(top.values.tolist(), abs=1e-5)
