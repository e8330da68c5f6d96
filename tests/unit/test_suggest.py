"""suggest: the one close-match hint."""

from __future__ import annotations

import pytest

from codebook_lens.suggest import did_you_mean, unknown_site_error


def test_did_you_mean_names_close_matches_best_first():
    names = ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out", "blocks.0.attn.hook_z"]
    assert did_you_mean("blocks.0.hook_mlp_ou", names) == (
        " Did you mean 'blocks.0.hook_mlp_out', 'blocks.1.hook_mlp_out', 'blocks.0.attn.hook_z'?"
    )
    assert did_you_mean("zzz", names) == ""
    assert did_you_mean("blocks.0.hook_mlp_ou", names, n=1).count("'") == 2


def test_unknown_site_error_lists_every_site():
    e = unknown_site_error("a.hook_x", ["a.hook_y", "b"], "stored codes")
    assert isinstance(e, KeyError)
    assert e.args[0] == (
        "no stored codes at site 'a.hook_x'. Did you mean 'a.hook_y'? Available sites: "
        "['a.hook_y', 'b']"
    )
    with pytest.raises(KeyError):
        raise e
