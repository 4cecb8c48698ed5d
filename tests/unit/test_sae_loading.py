"""Loading SAEs from disk and the registry, with validation against the model."""

from __future__ import annotations

import json

import pytest
import torch

from circuitscan.pipelines.fingerprint import fingerprint_tensors
from circuitscan.schemas.hooks import HookSite
from circuitscan.schemas.models import SAESpec
from circuitscan.services.sae_loading import (
    SAELoadError,
    default_sae_names,
    load_sae,
)
from circuitscan.testing import build_tiny_model, build_tiny_sae


@pytest.mark.parametrize("architecture", ["standard", "topk"])
@pytest.mark.parametrize("point", ["resid_post", "z"])
def test_round_trip(tmp_path, tiny_model, architecture, point) -> None:
    site = HookSite(layer=1, point=point)
    sae = build_tiny_sae(tiny_model, site, architecture=architecture)
    sae.save_model(tmp_path / "sae")
    loaded = load_sae(SAESpec(source=str(tmp_path / "sae")), tiny_model)
    assert loaded.site == site
    assert loaded.name == "sae"
    assert type(loaded.sae) is type(sae)
    assert loaded.sae.W_dec.dtype == torch.float64
    assert loaded.fingerprint == fingerprint_tensors(sae.state_dict())
    x = torch.randn(5, 3, *((4, 4) if point == "z" else (16,)), dtype=torch.float64)
    assert torch.equal(loaded.sae(x), sae(x))


def test_dtype_and_fingerprint_change(tmp_path, tiny_model) -> None:
    sae = build_tiny_sae(tiny_model, HookSite(layer=0, point="resid_pre"))
    sae.save_model(tmp_path / "sae")
    wide = load_sae(str(tmp_path / "sae"), tiny_model)
    narrow = load_sae(str(tmp_path / "sae"), tiny_model, dtype=torch.float32)
    assert narrow.sae.W_enc.dtype == torch.float32
    assert narrow.fingerprint != wide.fingerprint


def test_missing_and_malformed(tmp_path, tiny_model) -> None:
    with pytest.raises(SAELoadError, match="not found"):
        load_sae(str(tmp_path / "nowhere"), tiny_model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SAELoadError, match="missing"):
        load_sae(str(tmp_path / "empty"), tiny_model)


def test_unknown_default_lists_available(tiny_model) -> None:
    names = default_sae_names()
    with pytest.raises(SAELoadError, match="no default SAE named 'nope'") as info:
        load_sae("default/nope", tiny_model)
    for name in names:
        assert name in str(info.value)


def test_hook_missing(tmp_path, tiny_model) -> None:
    deep = build_tiny_model(n_layers=4)
    sae = build_tiny_sae(deep, HookSite(layer=3, point="resid_post"))
    sae.save_model(tmp_path / "sae")
    with pytest.raises(SAELoadError, match=r"'blocks\.3\.hook_resid_post', which this model"):
        load_sae(str(tmp_path / "sae"), tiny_model)


@pytest.mark.parametrize("point", ["resid_post", "z"])
def test_width_mismatch(tmp_path, tiny_model, point) -> None:
    other = build_tiny_model(d_model=24, n_heads=3, d_head=8)
    sae = build_tiny_sae(other, HookSite(layer=0, point=point))
    sae.save_model(tmp_path / "sae")
    detail = r"width 16 \(n_heads·d_head\)" if point == "z" else "width 16 of"
    with pytest.raises(SAELoadError, match=f"d_in=24 does not match .*{detail}"):
        load_sae(str(tmp_path / "sae"), tiny_model)


def test_unreadable_config(tmp_path, tiny_model) -> None:
    sae = build_tiny_sae(tiny_model, HookSite(layer=0, point="resid_post"))
    sae.save_model(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    cfg["architecture"] = "no-such-architecture"
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAELoadError, match="sae_lens cannot load"):
        load_sae(str(tmp_path / "sae"), tiny_model)


def test_pretrained_errors(tiny_model) -> None:
    with pytest.raises(SAELoadError, match="expected 'pretrained:<release>/<sae_id>'"):
        load_sae("pretrained:gpt2-small-res-jb", tiny_model)
    with pytest.raises(SAELoadError, match="unknown sae_lens release"):
        load_sae("pretrained:no-such-release/x", tiny_model)
    with pytest.raises(SAELoadError, match="has no SAE 'nope'"):
        load_sae("pretrained:gpt2-small-res-jb/nope", tiny_model)
    with pytest.raises(SAELoadError, match="not in the local Hugging Face cache"):
        load_sae("pretrained:gpt2-small-res-jb/blocks.0.hook_resid_pre", tiny_model)
