"""Model loading: local HF directories, and the errors a user can fix."""

from __future__ import annotations

import json

import pytest
import torch

from circuitscan.schemas.models import ModelSpec
from circuitscan.services.model_loading import ModelLoadError, load_model


def test_local_hf_directory_loads_with_fingerprint(tiny_hf_model_dir) -> None:
    first = load_model(ModelSpec(source=str(tiny_hf_model_dir)))
    again = load_model(ModelSpec(source=str(tiny_hf_model_dir), dtype="float64"))
    assert first.model.cfg.n_layers == 2 and first.model.cfg.n_key_value_heads == 2
    assert (
        first.fingerprint
        and first.fingerprint == load_model(ModelSpec(source=str(tiny_hf_model_dir))).fingerprint
    )
    assert again.model.cfg.dtype == torch.float64
    # The float64 copy holds the same weights as the float32 one.
    torch.testing.assert_close(again.model.W_E.float(), first.model.W_E, rtol=0, atol=0)


def test_missing_path_is_named(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(ModelSpec(source=str(tmp_path / "nowhere.gguf")))
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_model(ModelSpec(source=str(tmp_path)))


def test_unsupported_architecture_is_named(tmp_path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["FrobnicatorForCausalLM"], "model_type": "frobnicator"})
    )
    with pytest.raises(ModelLoadError, match="unsupported architecture"):
        load_model(ModelSpec(source=str(tmp_path)))


def test_hub_name_while_offline_is_refused() -> None:
    with pytest.raises(ModelLoadError, match=r"downloads are off|not in the local"):
        load_model(ModelSpec(source="gpt2"))
    with pytest.raises(ModelLoadError, match="not a path that exists"):
        load_model(ModelSpec(source="definitely-not-a-model-name"))
