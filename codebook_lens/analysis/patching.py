"""Hook-function factories that edit codes: ablate, force, patch.

Each returns an ordinary TransformerLens hook function for the hook point
``codes_hook_name(site)`` (``f"{site}.hook_codes"``), usable with ``run_with_hooks``,
``hooks()`` and during ``generate``::

    cm.run_with_hooks(tokens, fwd_hooks=[(codes_hook_name(site), ablate_codes(codes=[3]))])

Codes arrive as ``[batch, pos, k]`` or ``[batch, pos, head, k]`` (per-head sites). Positions
are resolved against the current sequence length each call, so negative positions (-1 = the
last token) follow the growing sequence during generation. Without the KV cache every step sees
the whole sequence; with it, a step sees only the new token, so use ``positions=None`` (every
position) or -1 there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor

from codebook_lens.analysis._common import HeadSpec, PositionSpec, head_mask, position_mask

__all__ = ["ablate_codes", "force_codes", "set_codes", "patch_codes", "CodesHook", "select_mask"]

CodesHook = Callable[[Tensor, Any], Tensor]


def select_mask(
    codes: Int[Tensor, "batch pos *head k"],
    positions: PositionSpec = None,
    heads: HeadSpec = None,
    name: str = "codes",
) -> Tensor:
    """Bool mask ``[batch, pos, (head)]`` of the selected positions and heads of ``codes``."""
    if codes.dim() not in (3, 4):
        raise ValueError(
            f"{name}: expected codes [batch, pos, k] or [batch, pos, head, k], got "
            f"{tuple(codes.shape)}; hook {name} is not a codes hook (use codes_hook_name(site))"
        )
    b, p = codes.shape[:2]
    pm = position_mask(positions, p, b, codes.device).expand(b, p)
    if codes.dim() == 3:
        if heads is not None:
            raise ValueError(
                f"{name}: these codes have no head axis (a site without heads); drop heads="
            )
        return pm
    hm = head_mask(heads, codes.shape[2], codes.device)
    return pm.unsqueeze(-1) & hm


def _name(hook: Any) -> str:
    return getattr(hook, "name", None) or "codes"


def ablate_codes(
    codes: int | Sequence[int] | Tensor | None = None,
    positions: PositionSpec = None,
    heads: HeadSpec = None,
    slots: int | Sequence[int] | None = None,
) -> CodesHook:
    """A hook that removes codes (sets their slot to -1, so they contribute nothing).

    Args:
        codes: Ids to remove (None: every id).
        positions: Positions to edit: an int, ints, a slice, a Bool mask ``[pos]`` or
            ``[batch, pos]``, or None for all. Negative ints count from the end.
        heads: Heads (groups) to edit at per-head sites (None: all).
        slots: Slots to edit (None: all).
    """
    ids = None if codes is None else torch.as_tensor(codes, dtype=torch.long).reshape(-1)

    def hook(x: Tensor, hook: Any = None) -> Tensor:
        mask = select_mask(x, positions, heads, _name(hook)).unsqueeze(-1)
        if slots is not None:
            k = x.shape[-1]
            sm = torch.zeros(k, dtype=torch.bool, device=x.device)
            si = torch.as_tensor(slots, dtype=torch.long).reshape(-1)
            if si.numel() and (int(si.max()) >= k or int(si.min()) < -k):
                raise IndexError(f"slot(s) {si.tolist()} out of range for k={k}")
            sm[si.to(x.device)] = True
            mask = mask & sm
        if ids is not None:
            mask = mask & torch.isin(x, ids.to(x.device))
        return x.masked_fill(mask, -1)

    return hook


def _code_per_head(code: Any, x: Tensor, heads: HeadSpec) -> Tensor:
    """The forced id broadcastable to ``x.shape[:-1]`` (one id, or one per selected head)."""
    c = torch.as_tensor(code, dtype=torch.long, device=x.device).reshape(-1)
    if c.numel() == 1:
        return c.reshape(())
    if x.dim() == 3:
        raise ValueError(
            f"{c.numel()} codes given for a site without heads; give one code (or use several "
            "force_codes hooks with slot='append')"
        )
    h = x.shape[2]
    sel = torch.arange(h, device=x.device) if heads is None else None
    if sel is None:
        sel = torch.as_tensor(heads, dtype=torch.long, device=x.device).reshape(-1) % h
    if c.numel() != sel.numel():
        raise ValueError(
            f"{c.numel()} codes for {sel.numel()} heads; give one code, or one per head in heads="
        )
    full = torch.full((h,), -1, dtype=torch.long, device=x.device)
    full[sel] = c
    return full


def force_codes(
    code: int | Sequence[int] | Tensor,
    positions: PositionSpec = None,
    heads: HeadSpec = None,
    slot: int | Literal["append", "only"] = "append",
) -> CodesHook:
    """A hook that makes a code fire at chosen positions (and heads).

    Args:
        code: The id to force, or one id per selected head (in the order of ``heads``, or of
            all heads when ``heads`` is None), e.g. each head's best code for a state.
        positions: As in :func:`ablate_codes` (None: every position).
        heads: Heads (groups) at per-head sites (None: all).
        slot: ``"append"`` adds the code in a new slot (the k chosen codes stay; elsewhere the
            new slot is empty); an int overwrites that slot; ``"only"`` makes the code the only
            one (slot 0, other slots emptied).
    """
    if not (slot in ("append", "only") or isinstance(slot, int)):
        raise ValueError(f"slot={slot!r}; choose 'append', 'only' or a slot index")

    def hook(x: Tensor, hook: Any = None) -> Tensor:
        mask = select_mask(x, positions, heads, _name(hook))
        c = _code_per_head(code, x, heads)
        mask = mask & (c >= 0)
        new = torch.where(mask, c, torch.full((), -1, dtype=x.dtype, device=x.device)).to(x.dtype)
        if slot == "append":
            return torch.cat([x, new.unsqueeze(-1)], dim=-1)
        out = x.clone()
        if slot == "only":
            out = out.masked_fill(mask.unsqueeze(-1), -1)
            out[..., 0] = torch.where(mask, new, out[..., 0])
            return out
        k = x.shape[-1]
        if not -k <= slot < k:
            raise IndexError(f"slot {slot} out of range for k={k}; use slot='append' to add one")
        out[..., slot] = torch.where(mask, new, out[..., slot])
        return out

    return hook


def set_codes(
    values: Int[Tensor, "batch *head slots"],
    positions: PositionSpec = -1,
    heads: HeadSpec = None,
) -> CodesHook:
    """A hook that replaces the whole code list at chosen positions with per-row ``values``.

    Args:
        values: Codes per batch row ``[batch, slots]`` (sites without heads) or
            ``[batch, head, slots]``; batch 1 broadcasts, and a run batch that is a multiple of
            ``batch`` repeats each row (``repeat_interleave``). -1 marks an empty slot.
        positions: Positions to set (default: the last one).
        heads: Heads (groups) to set at per-head sites (None: all).
    """
    vals = torch.as_tensor(values)

    def hook(x: Tensor, hook: Any = None) -> Tensor:
        name = _name(hook)
        if vals.dim() != x.dim() - 1 or vals.shape[1:-1] != x.shape[2:-1]:
            raise ValueError(
                f"{name}: values {tuple(vals.shape)} must be [batch, *head, slots] for codes "
                f"{tuple(x.shape)}"
            )
        b = x.shape[0]
        if b % vals.shape[0]:
            raise ValueError(f"{name}: run batch {b} is not a multiple of values' {vals.shape[0]}")
        v = vals.to(x.device, x.dtype).repeat_interleave(b // vals.shape[0], 0)
        k, vk = x.shape[-1], v.shape[-1]
        if vk > k:
            x = torch.cat([x, x.new_full((*x.shape[:-1], vk - k), -1)], -1)
        elif vk < k:
            v = torch.cat([v, v.new_full((*v.shape[:-1], k - vk), -1)], -1)
        mask = select_mask(x, positions, heads, name).unsqueeze(-1)
        return torch.where(mask, v.unsqueeze(1), x)

    return hook


def patch_codes(
    source: Int[Tensor, "batch pos *head k"],
    positions: PositionSpec = None,
    heads: HeadSpec = None,
) -> CodesHook:
    """A hook that copies codes from another run (e.g. a clean one) at chosen positions/heads.

    Args:
        source: Codes of the same site from the other run, e.g.
            ``clean_cache[codes_hook_name(site)]``; batch 1 broadcasts. Slot counts may differ
            (the narrower side is padded with empty slots).
        positions: As in :func:`ablate_codes` (None: every position). During generation the
            run may be longer than ``source``; only positions ``source`` has may be selected.
        heads: Heads (groups) at per-head sites (None: all).
    """
    src = torch.as_tensor(source)

    def hook(x: Tensor, hook: Any = None) -> Tensor:
        name = _name(hook)
        if src.dim() != x.dim() or (x.dim() == 4 and src.shape[2] != x.shape[2]):
            raise ValueError(
                f"{name}: source codes {tuple(src.shape)} do not match the run's codes "
                f"{tuple(x.shape)}; take them from the same site"
            )
        if src.shape[0] not in (1, x.shape[0]):
            raise ValueError(
                f"{name}: source batch {src.shape[0]} vs run batch {x.shape[0]}; use the same "
                "batch size (or a source of batch 1)"
            )
        mask = select_mask(x, positions, heads, name)
        p, sp = x.shape[1], src.shape[1]
        s = src.to(x.device, x.dtype)
        if sp > p:
            s = s[:, :p]
        elif sp < p:
            if mask[:, sp:].any():
                raise IndexError(
                    f"{name}: patching positions >= {sp}, which the source run does not have; "
                    f"select positions < {sp}"
                )
            pad = torch.full((s.shape[0], p - sp, *s.shape[2:]), -1, dtype=x.dtype, device=x.device)
            s = torch.cat([s, pad], dim=1)
        k, sk = x.shape[-1], s.shape[-1]
        if sk < k:
            s = torch.cat(
                [s, torch.full((*s.shape[:-1], k - sk), -1, dtype=x.dtype, device=x.device)], -1
            )
        elif sk > k:
            x = torch.cat(
                [x, torch.full((*x.shape[:-1], sk - k), -1, dtype=x.dtype, device=x.device)], -1
            )
        return torch.where(mask.unsqueeze(-1), s.expand_as(x), x)

    return hook
