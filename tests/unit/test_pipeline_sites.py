"""Site patterns: what they match, in which order, with which codebook settings, and the errors
for patterns that match nothing or fields that do not exist."""

from __future__ import annotations

import fnmatch

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codebook_lens import CodebookModel
from codebook_lens.pipeline.sites import SiteGroup, attach_site_groups, match_sites
from tests.conftest import make_model

NAMES = [f"blocks.{i}.{s}" for i in range(12) for s in ("attn.hook_z", "hook_mlp_out")] + [
    "blocks.0.attn.hook_pattern",
    "blocks.0.attn.hook_attn_scores",
    "blocks.0.hook_mlp_out.hook_codes",
    "hook_embed",
]


def test_match_sites_orders_layers_numerically_and_skips_non_activations():
    got = match_sites(NAMES, "blocks.*.attn.hook_z")
    assert got == [f"blocks.{i}.attn.hook_z" for i in range(12)]  # 10 after 9, not after 1
    assert match_sites(NAMES, "blocks.[0-3].hook_mlp_out") == [
        f"blocks.{i}.hook_mlp_out" for i in range(4)
    ]
    assert "blocks.0.attn.hook_pattern" not in match_sites(NAMES, "blocks.0.attn.*")
    assert "blocks.0.hook_mlp_out.hook_codes" not in match_sites(NAMES, "blocks.0.*")


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            ["blocks", "0", "1", "11", "*", "?", "[0-3]", "hook_z", "attn", "hook_mlp_out"]
        ),
        min_size=1,
        max_size=4,
    )
)
def test_match_sites_equals_a_plain_fnmatch_filter(parts):
    pattern = ".".join(parts)
    want = sorted(
        n
        for n in NAMES
        if fnmatch.fnmatchcase(n, pattern)
        and not n.endswith(("hook_pattern", "hook_attn_scores", "hook_codes", "hook_tokens"))
    )
    if not want:
        with pytest.raises(ValueError, match="matches no hook point"):
            match_sites(NAMES, pattern)
    else:
        assert sorted(match_sites(NAMES, pattern)) == want


def test_pattern_matching_nothing_lists_the_closest_hook_names():
    with pytest.raises(ValueError) as e:
        match_sites(NAMES, "blocks.*.attn.hook_zz")
    msg = str(e.value)
    assert "'blocks.*.attn.hook_zz' matches no hook point" in msg
    assert "blocks.0.attn.hook_z" in msg


def test_site_group_fields_and_flat_table_form():
    g = SiteGroup.from_dict(
        {"pattern": "blocks.*.hook_mlp_out", "n_codes": 64, "k": 2, "input_norm": "layernorm"}
    )
    assert g.codebook == {"input_norm": "layernorm"}
    cfg = g.codebook_config(d_in=32, n_groups=1)
    assert (cfg.n_codes, cfg.k, cfg.input_norm, cfg.d_in) == (64, 2, "layernorm", 32)
    assert SiteGroup.from_dict(g.to_dict()) == g


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"simlarity": "dot"}, "unknown codebook field 'simlarity'. Did you mean 'similarity'"),
        ({"d_in": 4}, "read off the site"),
        ({"n_codes": 4}, "set n_codes as the group's own field"),
        ({"similarity": "cosin"}, "choose one of"),
    ],
)
def test_bad_codebook_fields_are_refused_when_the_group_is_built(fields, match):
    with pytest.raises(ValueError, match=match):
        SiteGroup("blocks.*.hook_mlp_out", codebook=fields)


def test_k_above_n_codes_is_refused_at_build_time():
    with pytest.raises(ValueError, match="k"):
        SiteGroup("blocks.*.hook_mlp_out", n_codes=4, k=8)


def test_attach_site_groups_on_a_real_model(backend):
    cm = CodebookModel(make_model(backend))
    sites = attach_site_groups(
        cm,
        [
            SiteGroup("blocks.*.attn.hook_z", n_codes=16, k=2),
            SiteGroup(
                "blocks.1.hook_mlp_out", n_codes=32, k=1, codebook={"input_norm": "layernorm"}
            ),
        ],
    )
    assert sites == ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z", "blocks.1.hook_mlp_out"]
    z = cm.codebook("blocks.0.attn.hook_z").cfg
    assert (z.n_groups, z.d_in, z.n_codes, z.k) == (4, 8, 16, 2)  # one codebook per head
    m = cm.codebook("blocks.1.hook_mlp_out").cfg
    assert (m.n_groups, m.d_in, m.input_norm) == (1, 32, "layernorm")


def test_two_groups_claiming_one_site_is_an_error(backend):
    cm = CodebookModel(make_model(backend))
    with pytest.raises(ValueError, match="matched by two site groups"):
        attach_site_groups(
            cm,
            [
                SiteGroup("blocks.*.hook_mlp_out", n_codes=8, k=1),
                SiteGroup("blocks.1.hook_mlp_*", n_codes=8, k=1),
            ],
        )
    assert cm.sites == []  # nothing attached before the error
