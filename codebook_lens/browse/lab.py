"""The Lab: run a prompt with and without code interventions, side by side.

One run gives the codes at every site per position (read at ``f"{site}.hook_codes"`` after the
interventions), the next-token distribution (digit-unit prompts such as TokFSM's: the exact
next-unit distribution of :func:`codebook_lens.digit_units.next_unit_distribution`, with the
prompt format the run directory describes) and a sampled continuation (no KV
cache, so interventions at prompt positions hold at every step). Interventions are the
analysis hooks :func:`~codebook_lens.analysis.force_codes` and
:func:`~codebook_lens.analysis.ablate_codes`. Model runs hold one lock: hooks are added to the
shared model per call.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from codebook_lens.analysis import ablate_codes, code_logit_attribution, force_codes
from codebook_lens.browse.errors import BrowseError, bad_request
from codebook_lens.digit_units import DigitPrompts, next_unit_distribution
from codebook_lens.model import CodebookModel, codes_hook_name
from codebook_lens.tokenizer_files import load_tokenizer

__all__ = ["Intervention", "ModelRunner", "MAX_NEW_TOKENS"]

MAX_NEW_TOKENS = 64
"""Most tokens a lab run samples."""


@dataclass
class Intervention:
    """Force or ablate ``code`` at ``site`` (``head``: one head, None: all) at ``positions``."""

    site: str
    action: str  # "force" | "ablate"
    code: int | None = None  # ablate: None = every code
    head: int | None = None
    positions: list[int] | None = None  # None: every prompt position


class ModelRunner:
    """The saved CodebookModel behind a DIR, loaded on first use, with a lock around runs."""

    def __init__(
        self,
        model_path: Path | None,
        kind: str,
        tokenizer_path: Path | None,
        prompts: DigitPrompts | None,
    ):
        self.model_path, self.kind = model_path, kind
        self.tokenizer_path, self.prompts = tokenizer_path, prompts
        self.lock = threading.Lock()
        self._cm: CodebookModel | None = None
        self._tok: Any = None
        self.error: str | None = None if model_path else "this DIR names no model"
        self.heads: dict[str, int | None] = {}
        """Site -> number of heads at per-head sites, None at sites without a head axis."""

    # ------------------------------------------------------------------ loading
    def model(self) -> CodebookModel:
        """The CodebookModel, or a 409 saying why there is none."""
        if self._cm is None and self.error is None:
            try:
                self._cm = CodebookModel.load(self.model_path).eval()
                if self.tokenizer_path is not None:
                    self._tok = load_tokenizer(self.tokenizer_path)
            except Exception as e:  # noqa: BLE001 - reported to the user, not hidden
                self.error = f"cannot load the model at {self.model_path}: {e}"
        if self._cm is None:
            raise BrowseError(409, f"{self.error}; pass --model MODEL (a saved CodebookModel)")
        return self._cm

    def info(self) -> dict[str, Any]:
        """What the overview shows about the model (loads it)."""
        try:
            cm = self.model()
        except BrowseError as e:
            return {"loaded": False, "error": e.message}
        cfg = cm.cfg
        cbs = {
            s: {"n_codes": cb.cfg.n_codes, "k": cb.cfg.k, "n_groups": cb.cfg.n_groups,
                "similarity": cb.cfg.similarity, "input_norm": cb.cfg.input_norm}
            for s, cb in cm.codebooks.items()
        }  # fmt: skip
        return {
            "loaded": True,
            "n_layers": int(cfg.n_layers),
            "d_model": int(cfg.d_model),
            "n_ctx": int(cfg.n_ctx),
            "d_vocab": int(cfg.d_vocab),
            "codebooks": cbs,
        }

    # ------------------------------------------------------------------ prompts
    def tokenize(self, prompt: str) -> list[int]:
        """Token ids of a prompt: digit units (BOS added), the tokenizer's, or ids."""
        cm = self.model()
        if self.prompts is not None:
            try:
                return self.prompts.tokenize(prompt)
            except ValueError as e:
                raise bad_request(str(e)) from e
        if self._tok is not None:
            ids = self._tok(prompt, add_special_tokens=False)["input_ids"]
            bos = self._tok.bos_token_id
            ids = ([bos] if bos is not None else []) + list(ids)
        else:
            try:
                ids = [int(t) for t in prompt.replace(",", " ").split()]
            except ValueError:
                raise bad_request(
                    "this model has no tokenizer: write the prompt as token ids, e.g. '1 5 2'"
                ) from None
        d_vocab = int(cm.cfg.d_vocab)
        if not ids or min(ids) < 0 or max(ids) >= d_vocab:
            raise bad_request(f"the prompt needs token ids in [0, {d_vocab})")
        return ids

    # ------------------------------------------------------------------ interventions
    def hooks(self, ivs: list[Intervention], n_prompt: int) -> list[tuple[str, Callable]]:
        """Forward hooks for ``ivs``, checked against the model (400 on a bad one)."""
        cm = self.model()
        out = []
        for iv in ivs:
            if iv.site not in cm.codebooks:
                raise bad_request(f"no codebook at {iv.site!r}; sites are {cm.sites}")
            cb = cm.codebooks[iv.site]
            n_heads = self.heads.get(iv.site)
            if iv.head is not None and not (n_heads and 0 <= iv.head < n_heads):
                have = f"heads 0..{n_heads - 1}" if n_heads else "no head axis"
                raise bad_request(f"head {iv.head} out of range; {iv.site} has {have}")
            if iv.code is not None and not 0 <= iv.code < cb.cfg.n_codes:
                raise bad_request(f"code {iv.code} out of range; {iv.site} has {cb.cfg.n_codes}")
            pos = iv.positions
            if pos is not None:
                if any(not -n_prompt <= p < n_prompt for p in pos):
                    raise bad_request(
                        f"positions {pos} out of range for a prompt of {n_prompt} tokens"
                    )
                pos = sorted({p % n_prompt for p in pos})  # absolute: they hold while sampling
            heads = iv.head if n_heads else None
            if iv.action == "force":
                if iv.code is None:
                    raise bad_request("force needs a code")
                hook = force_codes(iv.code, positions=pos, heads=heads)
            elif iv.action == "ablate":
                hook = ablate_codes(iv.code, positions=pos, heads=heads)
            else:
                raise bad_request(f"action={iv.action!r}; choose force or ablate")
            out.append((codes_hook_name(iv.site), hook))
        return out

    # ------------------------------------------------------------------ runs
    @torch.no_grad()
    def run(
        self, ids: list[int], ivs: list[Intervention], n_new: int, seed: int, top: int
    ) -> dict[str, Any]:
        """Unpatched and patched results for a prompt."""
        cm = self.model()
        n_ctx = int(cm.cfg.n_ctx)
        if len(ids) > n_ctx:
            raise bad_request(f"the prompt has {len(ids)} tokens; the model's n_ctx is {n_ctx}")
        if not 0 <= n_new <= MAX_NEW_TOKENS:
            raise bad_request(f"n_new={n_new}; choose 0..{MAX_NEW_TOKENS}")
        n_new = min(n_new, n_ctx - len(ids))
        hooks = self.hooks(ivs, len(ids))
        with self.lock:
            base = self._one(ids, [], n_new, seed, top)
            patched = self._one(ids, hooks, n_new, seed, top) if hooks else base
        return {"tokens": ids, "n_new": n_new, "unpatched": base, "patched": patched}

    def _one(
        self, ids: list[int], hooks: list[tuple[str, Callable]], n_new: int, seed: int, top: int
    ) -> dict[str, Any]:
        cm = self.model()
        device = next(cm.parameters()).device
        toks = torch.tensor([ids], device=device)
        got: dict[str, Tensor] = {}

        def grab(site: str) -> Callable:
            def hook(x: Tensor, hook: Any) -> None:
                got[site] = x[0].detach().cpu()

            return hook

        grabs = [(codes_hook_name(s), grab(s)) for s in cm.sites]  # after the interventions
        logits = cm.run_with_hooks(toks, fwd_hooks=hooks + grabs)[0, -1].float()
        codes = {s: (c if c.dim() == 3 else c[:, None]).tolist() for s, c in got.items()}
        out: dict[str, Any] = {"codes": codes, "next": self._next(logits, toks, hooks, top)}
        out["continuation"] = self._sample(toks, logits, hooks, n_new, seed)
        return out

    def _next(self, logits: Tensor, toks: Tensor, hooks: list, top: int) -> dict[str, Any]:
        units = self.prompts
        if units is not None and (toks.shape[1] - 1) % units.n_digits == 0:
            cm = self.model()

            def model(t: Tensor) -> Tensor:
                return cm.run_with_hooks(t, fwd_hooks=hooks)

            n_ctx = int(cm.cfg.n_ctx)
            if toks.shape[1] + units.n_digits - 1 <= n_ctx:
                probs = next_unit_distribution(
                    model, toks, units.base, units.n_digits, units.n_units, n_ctx=n_ctx
                )[0].cpu()
                val, idx = probs.topk(min(top, probs.numel()))
                last = units.last_unit(toks[0].tolist())
                known = last is not None and last < len(units.successors)
                succ = list(units.successors[last]) if known else []
                return {
                    "kind": "state",
                    "last_state": last,
                    "successors": succ,
                    "items": [
                        {"id": int(i), "text": f"{int(i):0{units.n_digits}d}", "prob": float(v),
                         "valid": int(i) in succ}
                        for v, i in zip(val.tolist(), idx.tolist())
                    ],
                }  # fmt: skip
        probs = torch.softmax(logits, -1).cpu()
        val, idx = probs.topk(min(top, probs.numel()))
        return {
            "kind": "token",
            "items": [{"id": int(i), "prob": float(v)} for v, i in zip(val.tolist(), idx.tolist())],
        }

    def _sample(
        self, toks: Tensor, logits: Tensor, hooks: list, n_new: int, seed: int
    ) -> list[int]:
        """``n_new`` sampled tokens; ``logits`` are the prompt's last-position logits."""
        cm = self.model()
        g = torch.Generator().manual_seed(seed)
        seq = toks
        for step in range(n_new):  # no KV cache: every step sees (and patches) the whole sequence
            if step:
                logits = cm.run_with_hooks(seq, fwd_hooks=hooks)[0, -1].float()
            nxt = torch.multinomial(torch.softmax(logits.cpu(), -1), 1, generator=g)
            seq = torch.cat([seq, nxt.view(1, 1).to(seq.device)], dim=1)
        return seq[0, toks.shape[1] :].tolist()

    # ------------------------------------------------------------------ logit effect
    @torch.no_grad()
    def logit_effect(self, site: str, head: int, code: int, top: int = 10) -> dict[str, Any]:
        """Direct logit attribution of one code: its top and bottom tokens."""
        cm = self.model()
        try:  # reads weights only, so no lock: lab runs add hooks, not weights
            dla = code_logit_attribution(cm, site, codes=[code])  # [H, 1, V]
        except (ValueError, KeyError) as e:
            return {"available": False, "reason": str(e)}
        row = dla[head if dla.shape[0] > 1 else 0, 0].float().cpu()
        k = min(top, row.numel())
        hi_v, hi_i = row.topk(k)
        lo_v, lo_i = row.topk(k, largest=False)
        return {
            "available": True,
            "top": [
                {"id": int(i), "value": float(v)} for v, i in zip(hi_v.tolist(), hi_i.tolist())
            ],
            "bottom": [
                {"id": int(i), "value": float(v)} for v, i in zip(lo_v.tolist(), lo_i.tolist())
            ],
        }

    def codebook(self, site: str) -> Tensor | None:
        """The codebook vectors ``[G, N, d]`` of ``site`` (None without a model)."""
        try:
            cm = self.model()
        except BrowseError:
            return None
        cb = cm.codebooks.get(site)
        return None if cb is None else cb.codebook.detach().cpu()
