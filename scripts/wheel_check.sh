#!/usr/bin/env bash
# A new user's install: a wheel of this tree in a fresh venv with CPU torch 2.13.0 and no other
# pins (pip resolves the current transformer-lens), then the README quickstart,
# `codebook-lens demo --small` and `codebook-lens lm-demo --small` from a directory outside the
# source tree.
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
echo "wheel check passed"
