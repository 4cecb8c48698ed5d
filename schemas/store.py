"""What a feature store IS: its layout, its commit-manifest entries, and query results.

The store itself (Zarr I/O, backends, checksums) lives in ``services/store``;
these models are the contract between the writer (a worker, possibly on
another node), the committer (the job driver) and readers (CLI, HTTP API).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_serializer, model_validator

from circuitscan.schemas.errors import NotFoundError

LAYOUT_VERSION = 1

_STRICT = ConfigDict(frozen=True, extra="forbid")

ValueDType = Literal["float16", "bfloat16"]


class SiteLayout(BaseModel):
    """One SAE hook site of a store."""

    model_config = _STRICT
    label: str = Field(
        description="Site label used as the store key, e.g. 'L6.z' (HookSite.label)."
    )
    hook_name: str = Field(
        description="TransformerLens hook name the SAE reads, e.g. blocks.6.attn.hook_z."
    )
    d_sae: int = Field(ge=1, description="Number of SAE features (dictionary width).")
    sae_fingerprint: str = Field(default="", description="Content fingerprint of the SAE weights.")


class PairingLayout(BaseModel):
    """What a paired cache stores beside the clean prompts (docs/paired_caches.md)."""

    model_config = _STRICT
    align: Literal["same", "end"] = Field(
        description="How clean and corrupted positions pair: 'same' index, or from the 'end'."
    )
    graddrop: bool = Field(
        default=False, description="Whether AtP* GradDrop scores are stored (not yet: False)."
    )


class StoreLayout(BaseModel):
    """Everything that fixes the meaning and byte layout of a store.

    Two runs may write into one store only when their layouts are equal
    (``layout_hash``); ``FeatureStore.create`` refuses a mismatch.
    """

    model_config = _STRICT
    layout_version: int = Field(default=LAYOUT_VERSION, description="On-disk layout version.")
    sites: list[SiteLayout] = Field(
        description="SAE sites stored, in job order (empty for stores of job results only)."
    )
    value_dtype: ValueDType = Field(
        default="float16", description="On-disk dtype of activations (and gradients)."
    )
    gradients: bool = Field(default=True, description="Whether ∂metric/∂activation is stored.")
    top_k_per_token: int | None = Field(
        default=None, ge=1, description="Features kept per token (None: every non-zero)."
    )
    examples_per_feature: int = Field(
        default=32, ge=1, le=1024, description="Size of each feature's top-examples index."
    )
    shard_size: int = Field(
        default=64, ge=1, description="Prompts per shard (the last may be short)."
    )
    model_fingerprint: str = Field(
        default="", description="Content fingerprint of the model weights."
    )
    job_hash: str = Field(
        default="", description="JobSpec.content_hash() of the job writing the store."
    )
    job_spec: dict[str, object] | None = Field(
        default=None, description="The job spec as JSON (informational; not part of the hash)."
    )
    pairing: PairingLayout | None = Field(
        default=None,
        description="Paired caches: the corrupted side's arrays are stored (None: clean only).",
    )

    @model_serializer(mode="wrap")
    def _drop_unpaired(self, handler: Any) -> Any:
        # Stores without pairing keep the layout (and layout hash) they always had.
        data = handler(self)
        if isinstance(data, dict) and data.get("pairing") is None:
            data.pop("pairing", None)
        return data

    @model_validator(mode="after")
    def _unique_labels(self) -> StoreLayout:
        labels = [site.label for site in self.sites]
        if len(set(labels)) != len(labels):
            raise ValueError(f"duplicate site labels in store layout: {labels}")
        return self

    def site(self, label: str) -> SiteLayout:
        """The site with this label; NotFoundError (a ValueError) naming the known labels otherwise."""
        for site in self.sites:
            if site.label == label:
                return site
        raise NotFoundError(
            f"unknown site {label!r}; the store has {[s.label for s in self.sites]}"
        )

    def layout_hash(self) -> str:
        """Hash of the fields that decide compatibility (the informational job spec excluded)."""
        payload = self.model_dump(mode="json", exclude={"job_spec"})
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def shard_prompts(self, shard_id: int) -> range:
        """The global prompt indices shard ``shard_id`` owns (before clipping to the prompt count)."""
        return range(shard_id * self.shard_size, (shard_id + 1) * self.shard_size)


class ShardPack(BaseModel):
    """Where a packed shard keeps its objects: one pack object, members at byte offsets.

    A shard written since stores packed their shards is one object
    (``shards/<s>/<key>``): a header (magic, length, JSON member table) and then
    every member's bytes. Each member keeps its own checksum in the entry, so a
    reader fetches and verifies just the byte ranges it decodes; ``header`` and
    ``size`` cover every other byte of the pack.
    """

    model_config = _STRICT
    key: str = Field(description="The pack object, relative to the shard's prefix.")
    size: int = Field(ge=0, description="Bytes of the whole pack.")
    header: str = Field(description="'size:blake2b' of the pack's header bytes (its start).")
    offsets: dict[str, int] = Field(
        description="Each packed member (key relative to the shard) → its byte offset in the "
        "pack; its length is the size in its checksum."
    )


class ShardEntry(BaseModel):
    """The manifest entry of one written shard; committing it makes the shard visible.

    Produced by ``FeatureStore.write_shard`` on a worker, serialisable (JSON)
    so it can travel back to the driver, which calls ``commit_shard``.
    """

    model_config = _STRICT
    shard_id: int = Field(ge=0, description="Shard index.")
    layout_hash: str = Field(
        description="StoreLayout.layout_hash() of the store it was written for."
    )
    prompt_start: int = Field(ge=0, description="Global index of the shard's first prompt.")
    n_prompts: int = Field(ge=1, description="Prompts in the shard.")
    n_tokens: int = Field(ge=0, description="Real tokens (BOS included) in the shard.")
    n_entries: dict[str, int] = Field(description="Stored (token, feature) pairs per site label.")
    checksums: dict[str, str] = Field(
        description="Every stored object of the shard, key relative to the shard → 'size:blake2b'."
    )
    pack: ShardPack | None = Field(
        default=None,
        description="The pack holding the shard's objects; None for shards written before "
        "stores packed them (one object per key under the shard's prefix).",
    )
    # What the merged index folds in of this shard, per site label (encoded index
    # summaries, services/store/shard_summary.py), as the worker computed them: held
    # in memory from write_shard to commit_shard, never stored with the entry and
    # never serialised (a Ray worker returns them beside it, ShardOutcome).
    _index_summaries: dict[str, bytes] | None = PrivateAttr(default=None)

    def with_index_summaries(self, summaries: dict[str, bytes] | None) -> ShardEntry:
        self._index_summaries = summaries
        return self

    @property
    def index_summaries(self) -> dict[str, bytes] | None:
        return self._index_summaries

    def __eq__(self, other: object) -> bool:
        # The same entry whether or not it still carries its summaries (pydantic's
        # equality would compare them too).
        return isinstance(other, ShardEntry) and self.__dict__ == other.__dict__

    @model_validator(mode="after")
    def _packed_members_have_checksums(self) -> ShardEntry:
        if self.pack is not None:
            unlisted = sorted(set(self.pack.offsets) - set(self.checksums))
            if unlisted:
                raise ValueError(f"packed members without a checksum: {unlisted[:3]}")
        return self

    def digest(self) -> str:
        """One hash over all the shard's checksums (equal stores ⇔ equal digests)."""
        payload = json.dumps(self.checksums, sort_keys=True).encode()
        return hashlib.blake2b(payload, digest_size=16).hexdigest()


# --- query results ---------------------------------------------------------------


class ActiveFeatures(BaseModel):
    """The features active at one (prompt, position) of one site, sorted."""

    model_config = _STRICT
    site: str = Field(description="Site label.")
    prompt: int = Field(description="Global prompt index.")
    position: int = Field(description="Token position in the prompt (BOS is position 0).")
    token_id: int = Field(description="Token id at that position.")
    feature_ids: list[int] = Field(description="Active feature ids, in sort order.")
    activations: list[float] = Field(description="Feature activations (SAE units).")
    gradients: list[float] | None = Field(
        description="∂metric/∂activation (metric units per activation unit); None if not stored."
    )
    attributions: list[float] | None = Field(
        description="activation × gradient (metric units); None if gradients are not stored."
    )
    error_norm: float = Field(description="L2 norm of the SAE reconstruction error at that token.")
    dropped_mass: float = Field(
        description="Sum of activations dropped by top-k at that token (0 when all are kept)."
    )


class FeatureExample(BaseModel):
    """One top-activating occurrence of a feature, with its decoded context."""

    model_config = _STRICT
    prompt: int = Field(description="Global prompt index.")
    position: int = Field(description="Token position in the prompt (BOS is position 0).")
    activation: float = Field(description="Feature activation there (SAE units).")
    context_token_ids: list[int] = Field(description="Token ids of the context window.")
    context: list[str] | None = Field(
        description="Decoded context tokens (None when no tokenizer was given)."
    )
    hit_index: int = Field(description="Index of the hit token inside the context window.")


class FeatureSummary(BaseModel):
    """Firing statistics of one feature over all committed shards."""

    model_config = _STRICT
    site: str = Field(description="Site label.")
    feature: int = Field(description="Feature id.")
    count: int = Field(description="Tokens where the feature is stored as active.")
    total: float = Field(description="Sum of its stored activations.")
    max: float = Field(description="Largest stored activation (0 when it never fires).")
    mean_when_active: float = Field(description="total / count (0 when it never fires).")
    frequency: float = Field(description="count / tokens stored.")
