"""`codebook-lens export neuronpedia` on a real run (a tiny Hugging Face GPT-2 trained and
collected by the pipeline): every written record against Neuronpedia's format, and the numbers
against the code store, the tokenizer and the model's weights, recomputed here."""

from __future__ import annotations

import gzip
import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from codebook_lens.analysis import CodeStore, code_logit_attribution, top_examples
from codebook_lens.cli import main
from codebook_lens.data import pydoc_texts
from codebook_lens.pipeline.collect import collect_run
from codebook_lens.pipeline.config import RunConfig
from codebook_lens.pipeline.load import load_run
from codebook_lens.pipeline.train import train_run
from tests.hf_fixtures import save_hf_model, save_texts

pytestmark = pytest.mark.bridge

# ---------------------------------------------------------------------------------------------
# Neuronpedia's import format, written down from github.com/hijohnnylin/neuronpedia (commit
# ebb8426fc550ad5d1f76d52c271a624af3c08a57):
# - the keys: utils/neuronpedia-utils/neuronpedia_utils/db_models/{feature,activation,model,
#   source,source_set,source_release,explanation}.py, whose dataclass __dict__ its exporter
#   (utils/neuronpedia-utils/neuronpedia_utils/convert-saedashboard-to-neuronpedia-export.py)
#   writes as JSON lines;
# - the types: apps/webapp/prisma/schema.prisma (models Neuron, Activation, Model, Source,
#   SourceSet, SourceRelease, Explanation; enum Visibility);
# - the layout: apps/webapp/app/api/admin/import/route.ts reads <model>/<source>/release.jsonl,
#   model.jsonl, sourceset.jsonl, source.jsonl, features/*.jsonl.gz, activations/*.jsonl.gz,
#   explanations/batch-<n>.jsonl.gz; apps/webapp/lib/db/import.ts inserts feature ("Neuron") and
#   activation rows with jsonb_to_recordset over the table's own columns (other keys ignored),
#   the metadata rows with Prisma's create (no other keys allowed).
# A trailing "?" is a nullable column; "DateTime" is an ISO 8601 string in the files.
FEATURE_FIELDS = {
    "modelId": "String", "layer": "String", "index": "String", "creatorId": "String?",
    "createdAt": "DateTime", "maxActApprox": "Float?", "hasVector": "Boolean",
    "vector": "Float[]", "vectorLabel": "String?", "vectorDefaultSteerStrength": "Float?",
    "hookName": "String?", "topkCosSimIndices": "Int[]", "topkCosSimValues": "Float[]",
    "neuron_alignment_indices": "Int[]", "neuron_alignment_values": "Float[]",
    "neuron_alignment_l1": "Float[]", "correlated_neurons_indices": "Int[]",
    "correlated_neurons_pearson": "Float[]", "correlated_neurons_l1": "Float[]",
    "correlated_features_indices": "Int[]", "correlated_features_pearson": "Float[]",
    "correlated_features_l1": "Float[]", "neg_str": "String[]", "neg_values": "Float[]",
    "pos_str": "String[]", "pos_values": "Float[]", "frac_nonzero": "Float",
    "freq_hist_data_bar_heights": "Float[]", "freq_hist_data_bar_values": "Float[]",
    "logits_hist_data_bar_heights": "Float[]", "logits_hist_data_bar_values": "Float[]",
    "decoder_weights_dist": "Float[]", "sourceSetName": "String?",
}  # fmt: skip
ACTIVATION_FIELDS = {
    "id": "String", "tokens": "String[]", "index": "String", "layer": "String",
    "modelId": "String", "maxValue": "Float", "maxValueTokenIndex": "Int", "minValue": "Float",
    "values": "Float[]", "creatorId": "String", "dataSource": "String?", "dataIndex": "String?",
    "dfaValues": "Float[]", "dfaTargetIndex": "Int?", "dfaMaxValue": "Float?",
    "createdAt": "DateTime", "lossValues": "Float[]", "logitContributions": "String?",
    "binMin": "Float?", "binMax": "Float?", "binContains": "Float?",
    "qualifyingTokenIndex": "Int?",
    "zIndices": "Int[][]?",  # export-only: the import splits it into zKIndices / zQIndices
    "zValues": "Float[]?",
}  # fmt: skip
MODEL_FIELDS = {
    "id": "String", "instruct": "Boolean", "creatorId": "String", "displayNameShort": "String",
    "displayName": "String", "tlensId": "String?", "dimension": "Int?",
    "visibility": "Visibility", "defaultSourceSetName": "String?", "defaultSourceId": "String?",
    "inferenceEnabled": "Boolean", "layers": "Int", "neuronsPerLayer": "Int",
    "createdAt": "DateTime", "owner": "String", "updatedAt": "DateTime", "website": "String?",
}  # fmt: skip
SOURCE_FIELDS = {
    "id": "String", "modelId": "String", "setName": "String", "creatorId": "String",
    "hasDashboards": "Boolean", "inferenceEnabled": "Boolean",
    "inferenceHosts": "String[]",  # a relation in the schema; exports write [] (route.ts skips it)
    "saelensConfig": "Json?", "saelensRelease": "String?", "saelensSaeId": "String?",
    "hfRepoId": "String?", "hfFolderId": "String?", "visibility": "Visibility",
    "defaultOfModelId": "String?", "hasUmap": "Boolean", "hasUmapLogSparsity": "Boolean",
    "hasUmapClusters": "Boolean", "num_prompts": "Int?", "num_tokens_in_prompt": "Int?",
    "dataset": "String?", "notes": "String?", "createdAt": "DateTime",
}  # fmt: skip
SOURCE_SET_FIELDS = {
    "modelId": "String", "name": "String", "creatorId": "String", "hasDashboards": "Boolean",
    "visibility": "Visibility", "description": "String", "type": "String",
    "creatorName": "String", "urls": "String[]", "creatorEmail": "String?",
    "releaseName": "String?", "defaultOfModelId": "String?", "defaultRange": "Int",
    "defaultShowBreaks": "Boolean", "showDfa": "Boolean", "showCorrelated": "Boolean",
    "showHeadAttribution": "Boolean", "showUmap": "Boolean", "createdAt": "DateTime",
}  # fmt: skip
RELEASE_FIELDS = {
    "name": "String", "description": "String", "creatorName": "String", "creatorId": "String",
    "visibility": "Visibility", "isNewUi": "Boolean", "featured": "Boolean",
    "descriptionShort": "String?", "urls": "String[]", "creatorEmail": "String?",
    "creatorNameShort": "String?", "defaultSourceSetName": "String?",
    "defaultSourceId": "String?", "defaultUmapSourceIds": "String[]", "createdAt": "DateTime",
}  # fmt: skip
# Explanations (explanations/batch-<n>.jsonl.gz: id, modelId, layer, index, description,
# authorId, embedding, triggeredByUserId, typeName, explanationModelName, notes, createdAt) are
# what Neuronpedia's auto-interp makes; an export of codes writes none.
VISIBILITY = {"PUBLIC", "UNLISTED", "PRIVATE"}
EXTRA = "codebook_lens"  # the one key of ours in feature and activation rows (import ignores it)

SCALARS = {
    "String": lambda v: isinstance(v, str),
    "Int": lambda v: isinstance(v, int) and not isinstance(v, bool) and abs(v) < 2**31,
    "Float": lambda v: isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v),
    "Boolean": lambda v: isinstance(v, bool),
    "DateTime": lambda v: isinstance(v, str) and datetime.fromisoformat(v) is not None,
    "Visibility": lambda v: v in VISIBILITY,
    "Json": lambda v: True,
}


def matches(value, kind: str) -> bool:
    if kind.endswith("?"):
        return value is None or matches(value, kind[:-1])
    if kind.endswith("[]"):
        return isinstance(value, list) and all(matches(v, kind[:-2]) for v in value)
    return SCALARS[kind](value)


def check_record(rec: dict, fields: dict[str, str], extra: tuple[str, ...] = ()) -> None:
    assert set(rec) == set(fields) | set(extra), set(rec) ^ (set(fields) | set(extra))
    for key, kind in fields.items():
        assert matches(rec[key], kind), (key, kind, rec[key])


def read_jsonl(path: Path) -> list[dict]:
    raw = path.read_bytes()
    text = gzip.decompress(raw).decode("utf-8") if path.suffix == ".gz" else raw.decode("utf-8")
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


# ---------------------------------------------------------------------------------------------
SITES = {  # per-head codes (k=2, sum) and a flat site whose codes count 1/k (combine="mean")
    "blocks.0.attn.hook_z": dict(n_codes=32, k=2),
    "blocks.1.attn.hook_z": dict(n_codes=32, k=2),
    "blocks.1.hook_mlp_out": dict(n_codes=16, k=2, combine="mean", input_norm="layernorm"),
}
SOURCES = {
    "blocks.0.attn.hook_z": "0-codebook-attn-z",
    "blocks.1.attn.hook_z": "1-codebook-attn-z",
    "blocks.1.hook_mlp_out": "1-codebook-mlp-out",
}
N_EXAMPLES, BEFORE, AFTER = 6, 5, 2


def trained_run(root: Path) -> str:
    """A trained and collected run in ``root/run`` (tiny GPT-2, BPE tokenizer, JSON-lines
    corpus, the codebooks of :data:`SITES`); returns its directory."""
    model = save_hf_model(root / "gpt2", "gpt2")
    data = save_texts(root / "data", [t.replace("\n", " ") for t in pydoc_texts()[:40]], "jsonl")
    groups = [
        dict(pattern="blocks.*.attn.hook_z", **SITES["blocks.0.attn.hook_z"]),
        dict(pattern="blocks.1.hook_mlp_out", **SITES["blocks.1.hook_mlp_out"]),
    ]
    cfg = RunConfig.from_dict(
        dict(
            out=str(root / "run"), report=False, model=dict(name=str(model)), sites=groups,
            data=dict(path=data, context_len=32, batch_size=4, eval_tokens=256, eval_fraction=0.1),
            train=dict(steps=4, warmup_steps=1, log_every=2, eval_every=100, checkpoint_every=100,
                       progress=False),
        )
    )  # fmt: skip
    train_run(cfg)
    collect_run(cfg.out, tokens=1024, progress=False)
    return cfg.out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A trained and collected run and its export through the command line."""
    root = tmp_path_factory.mktemp("np_export")
    run_dir = trained_run(root)
    out = root / "export"
    flags = ["--n-examples", str(N_EXAMPLES), "--context-before", str(BEFORE)]
    flags += ["--context-after", str(AFTER), "--features-per-batch", "16", "--no-progress"]
    assert main(["export", "neuronpedia", run_dir, "--out", str(out), *flags]) == 0
    loaded = load_run(run_dir, device="cpu")
    return loaded, CodeStore.load(Path(run_dir) / "store"), out


def read_source(out: Path, source: str) -> dict[str, list[dict]]:
    d = out / "gpt2" / source
    rows = {name: read_jsonl(d / f"{name}.jsonl") for name in ("release", "model", "sourceset")}
    rows["source"] = read_jsonl(d / "source.jsonl")
    for kind in ("features", "activations"):
        files = sorted(
            (d / kind).glob("batch-*.jsonl.gz"), key=lambda f: int(f.name.split("-")[1][:-9])
        )
        assert files and all(f.name == f"batch-{i}.jsonl.gz" for i, f in enumerate(files))
        rows[kind] = [r for f in files for r in read_jsonl(f)]
    assert not (d / "explanations").exists()
    return rows


def test_layout_and_every_record_matches_the_format(run):
    loaded, store, out = run
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["format"] == "codebook_lens.neuronpedia" and manifest["model_id"] == "gpt2"
    assert sorted(p.name for p in (out / "gpt2").iterdir()) == sorted(SOURCES.values())
    metadata = {"release": RELEASE_FIELDS, "model": MODEL_FIELDS}
    metadata |= {"sourceset": SOURCE_SET_FIELDS, "source": SOURCE_FIELDS}
    for source in SOURCES.values():
        rows = read_source(out, source)
        for name, fields in metadata.items():
            assert len(rows[name]) == 1
            check_record(rows[name][0], fields)
        model, src, sset = rows["model"][0], rows["source"][0], rows["sourceset"][0]
        assert model["id"] == "gpt2" and model["layers"] == 2 and model["dimension"] == 32
        set_name = source.split("-", 1)[1]
        assert (src["id"], src["setName"], sset["name"]) == (source, set_name, set_name)
        assert src["modelId"] == sset["modelId"] == "gpt2"
        assert sset["releaseName"] == rows["release"][0]["name"] == "gpt2-codebook"
        assert (src["num_prompts"], src["num_tokens_in_prompt"]) == (store.n_seq, store.seq_len)
        for rec in rows["features"]:
            check_record(rec, FEATURE_FIELDS, (EXTRA,))
            assert (rec["modelId"], rec["layer"], rec["sourceSetName"]) == (
                "gpt2",
                source,
                set_name,
            )
            assert 0 < rec["frac_nonzero"] <= 1
            assert len(rec["pos_str"]) == len(rec["pos_values"]) == 10
            assert len(rec["neg_str"]) == len(rec["neg_values"]) == 10
            assert rec["pos_values"] == sorted(rec["pos_values"], reverse=True)
            assert rec["neg_values"] == sorted(rec["neg_values"])
        ids = set()
        for rec in rows["activations"]:
            check_record(rec, ACTIVATION_FIELDS, (EXTRA,))
            assert (rec["modelId"], rec["layer"]) == ("gpt2", source)
            assert 0 < len(rec["tokens"]) == len(rec["values"]) <= BEFORE + AFTER + 1
            assert rec["maxValue"] == max(rec["values"]) == rec["values"][rec["maxValueTokenIndex"]]
            assert rec["minValue"] == min(rec["values"]) >= 0
            ids.add(rec["id"])
        assert len(ids) == len(rows["activations"])  # the import keeps the first of an id


def code_arrays(store: CodeStore, site: str) -> np.ndarray:
    return store.code_range(site, 0, store.n_seq).numpy().astype(np.int64)  # [S, P, H, K]


def test_feature_numbers_match_the_store_and_weights(run):
    loaded, store, out = run
    cm, n_tokens = loaded.cm, store.n_tokens
    for site, source in SOURCES.items():
        rows = read_source(out, source)
        codes, n_codes = code_arrays(store, site), SITES[site]["n_codes"]
        value = 1 / SITES[site]["k"] if SITES[site].get("combine") == "mean" else 1.0
        counts = {}  # (head, code) -> positions where it fires, counted by plain loops
        for h in range(codes.shape[2]):
            for c in range(n_codes):
                n = int(np.any(codes[:, :, h, :] == c, axis=-1).sum())
                if n:
                    counts[h, c] = n
        feats = {int(r["index"]): r for r in rows["features"]}
        assert sorted(feats) == sorted(h * n_codes + c for h, c in counts)  # every live code
        for (h, c), n in counts.items():
            rec = feats[h * n_codes + c]
            assert rec[EXTRA] == {"site": site, "head": h, "code": c, "count": n}
            assert rec["frac_nonzero"] == pytest.approx(n / n_tokens, rel=1e-12)
            assert rec["maxActApprox"] == pytest.approx(value)
            assert rec["freq_hist_data_bar_heights"] == [n]
        rec = max(feats.values(), key=lambda r: r["frac_nonzero"])  # one code's logits by hand
        h, c = rec[EXTRA]["head"], rec[EXTRA]["code"]
        effect = by_hand_logits(cm, site, h, c) * value
        ours = code_logit_attribution(cm, site, codes=[c])[h, 0].numpy()
        np.testing.assert_allclose(effect, ours, rtol=1e-4, atol=1e-6)
        top, bottom = np.argsort(-effect)[:10], np.argsort(effect)[:10]
        np.testing.assert_allclose(rec["pos_values"], effect[top], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(rec["neg_values"], effect[bottom], rtol=1e-4, atol=1e-6)
        tok = cm.tokenizer
        assert rec["pos_str"] == [tok.decode([int(t)]) for t in top]
        assert rec["neg_str"] == [tok.decode([int(t)]) for t in bottom]


def by_hand_logits(cm, site: str, head: int, code: int) -> np.ndarray:
    """What one code (vector as stored, before 1/k) writes, through W_O at attn.hook_z, centred
    and scaled by the final LayerNorm's weight (scale 1), times W_U; numpy."""
    book = cm.codebook(site).codebook.detach().numpy()  # [groups, n_codes, d_in]
    vec = book[head if book.shape[0] > 1 else 0, code]
    if site.endswith("attn.hook_z"):
        layer = int(site.split(".")[1])
        vec = vec @ cm.W_O[layer, head].detach().numpy()
    vec = vec - vec.mean()  # GPT-2's final LayerNorm
    ln = cm.ln_final
    w = getattr(ln, "w", None)
    w = w if w is not None else ln.weight
    return (vec * w.detach().numpy()) @ cm.W_U.detach().numpy()


def test_activation_records_match_the_store(run):
    loaded, store, out = run
    tokens = store.tokens.numpy().astype(np.int64)
    decode = loaded.cm.tokenizer.decode
    for site, source in SOURCES.items():
        rows = read_source(out, source)
        codes, n_codes = code_arrays(store, site), SITES[site]["n_codes"]
        value = 1 / SITES[site]["k"] if SITES[site].get("combine") == "mean" else 1.0
        by_feature: dict[int, list[dict]] = {}
        for rec in rows["activations"]:
            by_feature.setdefault(int(rec["index"]), []).append(rec)
            x = rec[EXTRA]
            seq, start, h = x["seq"], x["start"], x["head"]
            code = int(rec["index"]) - h * n_codes
            assert rec["dataIndex"] == str(seq) and x["pos"] - start == rec["maxValueTokenIndex"]
            assert start == max(0, x["pos"] - BEFORE)
            window = range(start, start + len(rec["tokens"]))
            assert window.stop == min(store.seq_len, x["pos"] + AFTER + 1)
            assert rec["tokens"] == [decode([int(tokens[seq, p])]) for p in window]
            fires = [bool(np.any(codes[seq, p, h] == code)) for p in window]
            assert rec["values"] == [value if f else 0.0 for f in fires]
            assert codes[seq, x["pos"], h, x["slot"]] == code
        feats = {int(r["index"]): r[EXTRA] for r in rows["features"]}
        for index, f in feats.items():  # the same examples, in the same order, as top_examples
            ex = top_examples(store, site, f["code"], head=f["head"], n=N_EXAMPLES)
            got = [(r[EXTRA]["seq"], r[EXTRA]["pos"]) for r in by_feature.get(index, [])]
            assert got == list(zip(ex.seq.tolist(), ex.pos.tolist())), (site, index)
            assert len(got) == min(f["count"], N_EXAMPLES)


def test_cli_refuses_an_existing_export_and_a_bad_site(run, tmp_path):
    loaded, _, out = run
    with pytest.raises(SystemExit) as e:
        main(["export", "neuronpedia", str(loaded.dir.path), "--out", str(out), "--no-progress"])
    assert "--overwrite" in str(e.value.code) and "\n" not in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        main(["export", "neuronpedia", str(loaded.dir.path), "--out", str(tmp_path / "x"),
              "--site", "blocks.0.hook_zz"])  # fmt: skip
    assert "blocks.0.attn.hook_z" in str(e.value.code)  # the close match is named
    assert not (tmp_path / "x").exists()


def test_values_are_what_the_saelens_codebook_encodes(run):
    """The exported values equal the SAELens "codebook" architecture's feature activations at
    every window position (transformer-lens 3.x, where SAELens installs)."""
    pytest.importorskip("sae_lens")
    from codebook_lens.saelens import to_sae_lens

    loaded, store, out = run
    cm, n_seq = loaded.cm, 2
    for site, source in SOURCES.items():
        with cm.disabled(site):  # the site's input: what the codebook (and the SAE) sees
            _, cache = cm.run_with_cache(store.tokens[:n_seq].long())
        acts = to_sae_lens(cm, site).encode(cache[site]).detach().numpy()  # [seq, pos, d_sae]
        checked = 0
        for rec in read_source(out, source)["activations"]:
            x, f = rec[EXTRA], int(rec["index"])
            if x["seq"] < n_seq:
                window = slice(x["start"], x["start"] + len(rec["values"]))
                np.testing.assert_allclose(rec["values"], acts[x["seq"], window, f], atol=1e-7)
                checked += 1
        assert checked > 0, site
