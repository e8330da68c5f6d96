#!/usr/bin/env bash
# A new user's install: a wheel of this tree in a fresh venv with CPU torch 2.13.0 and no other
# pins (pip resolves the current transformer-lens), then the README quickstart,
# `codebook-lens demo --small`, `codebook-lens lm-demo --small` and a train -> evaluate ->
# collect -> export run on a tiny local Hugging Face model, from a directory outside the source
# tree.
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip wheel -q --no-deps -w "$tmp/dist" "$src"
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q torch==2.13.0
"$tmp/venv/bin/pip" install -q "$tmp"/dist/codebook_lens-*.whl
cd "$tmp"
"$tmp/venv/bin/python" - "$src/README.md" <<'PY'
import importlib.metadata as md, pathlib, re, sys
import codebook_lens
pkg = pathlib.Path(codebook_lens.__file__).parent
assert (pkg / "py.typed").exists(), "py.typed is missing from the wheel"
assert not str(pkg).startswith(sys.argv[1].rsplit("/", 1)[0] + "/codebook_lens"), pkg
text = pathlib.Path(sys.argv[1]).read_text()
code = re.search(r"```python\n(.*?)```", text.split("## Quickstart\n", 1)[1], re.S).group(1)
exec(compile(code, "README.md#quickstart", "exec"), {})
print(f"quickstart ok: codebook-lens {md.version('codebook-lens')} from {pkg}, "
      f"transformer-lens {md.version('transformer-lens')}, torch {md.version('torch')}")
PY
"$tmp/venv/bin/codebook-lens" demo --small --out "$tmp/demo_small" --cache-dir "$tmp/cache" \
  --no-progress > "$tmp/demo.txt"
test -s "$tmp/demo_small/report.html" && test -s "$tmp/demo_small/metrics.json"
head -5 "$tmp/demo.txt"
"$tmp/venv/bin/codebook-lens" lm-demo --small --out "$tmp/lm_small" --no-progress > "$tmp/lm.txt"
test -s "$tmp/lm_small/metrics.json" && test -s "$tmp/lm_small/codebook_model/cfg.json"
head -4 "$tmp/lm.txt"
# The train -> evaluate -> collect path on a tiny GPT-2 built with transformers and a BPE
# tokenizer trained with tokenizers, saved as a local directory (what a Hub name resolves to).
"$tmp/venv/bin/python" - "$tmp" <<'PY'
import sys, pathlib, transformers
from codebook_lens.data import pydoc_texts
from codebook_lens.lm.tokenizer import train_bpe_tokenizer
root = pathlib.Path(sys.argv[1])
texts = [t.replace("\n", " ") for t in pydoc_texts()[:40]]
tok = train_bpe_tokenizer(texts[:20], vocab_size=300)
cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=4,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
transformers.GPT2LMHeadModel(cfg).save_pretrained(root / "gpt2")
tok.save_pretrained(root / "gpt2")
(root / "corpus.txt").write_text("\n".join(texts))
PY
"$tmp/venv/bin/codebook-lens" train --model.name "$tmp/gpt2" --data.path "$tmp/corpus.txt" \
  --data.context-len 32 --data.batch-size 4 --data.eval-tokens 256 --data.eval-fraction 0.1 \
  --site 'blocks.*.attn.hook_z' --n-codes 32 --k 2 --train.steps 6 --no-train.progress \
  --out "$tmp/run" > "$tmp/train.txt" 2> "$tmp/train.err"
"$tmp/venv/bin/codebook-lens" evaluate "$tmp/run" --no-progress > "$tmp/eval.txt"
"$tmp/venv/bin/codebook-lens" collect "$tmp/run" --tokens 512 --no-progress > "$tmp/collect.txt"
test -s "$tmp/run/report.html" && test -s "$tmp/run/evaluation.json"
head -4 "$tmp/eval.txt"
tail -1 "$tmp/collect.txt"
# The SAE-ecosystem exports from the installed wheel (the dashboard's static files are package
# data: a wheel without them fails here).
"$tmp/venv/bin/codebook-lens" export neuronpedia "$tmp/run" --out "$tmp/np" --no-progress \
  > "$tmp/np.txt"
"$tmp/venv/bin/codebook-lens" export dashboard "$tmp/run" --out "$tmp/dash" --no-progress \
  > "$tmp/dash.txt"
ls "$tmp"/np/*/*/features/batch-0.jsonl.gz > /dev/null
grep -q "Feature" "$tmp"/dash/blocks.0.attn.hook_z.html
tail -1 "$tmp/np.txt"
echo "wheel check passed"
