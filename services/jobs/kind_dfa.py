"""DFA jobs in a worker: hook_z SAE features split by head and source position, per prompt.

A shard stores one row per (prompt, feature): the feature's pre-activation,
activation, constant part and its full [head][source] table, with each
source position's role (named position, 'dest', 'first' or 'other'), so the
driver's averages by head and by role are exact whatever the sharding and a
reader can still open any single prompt's table.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sae_lens import HookedSAETransformer

from circuitscan.pipelines.analyses.dfa import dfa_features
from circuitscan.schemas.hooks import HookSite
from circuitscan.schemas.jobs import DFAParams, JobSpec
from circuitscan.schemas.prompts import PromptRecord
from circuitscan.services.jobs.kinds import (
    ShardResult,
    StoreWriter,
    named_positions,
    tokenize_capped_counting,
)
from circuitscan.services.jobs.planning import ShardPlan
from circuitscan.services.sae_loading import LoadedSAE
from circuitscan.services.store import FeatureStore
from circuitscan.services.store.results import write_shard_outputs


class DFAJobError(ValueError):
    """A DFA job cannot run as specified (no hook_z SAE, a position a prompt lacks)."""


def dfa_site(params: DFAParams, sites: list[HookSite]) -> HookSite:
    """The hook_z site the job decomposes: the one named, else the first z SAE of the job."""
    z_sites = [site for site in sites if site.point == "z"]
    if params.site is not None:
        wanted = HookSite.parse(params.site)
        if wanted not in sites:
            raise DFAJobError(
                f"dfa site {wanted.label} has no SAE in this job (SAEs at "
                f"{[site.label for site in sites]})"
            )
        return wanted
    if not z_sites:
        raise DFAJobError(
            f"dfa jobs need an attention-output (hook_z) SAE; this job's SAEs are at "
            f"{[site.label for site in sites]}"
        )
    return z_sites[0]


def destination(
    position: str | int, length: int, named: Mapping[str, int] | None, prompt: int
) -> int:
    """The destination token index of one prompt of ``length`` real tokens (BOS included)."""
    if position == "last":
        return length - 1
    if isinstance(position, int):
        if position >= length:
            raise DFAJobError(
                f"dfa position {position} is outside prompt {prompt} ({length} tokens with BOS)"
            )
        return position
    if not named or position not in named:
        have = sorted(named) if named else []
        raise DFAJobError(
            f"prompt {prompt} has no named position {position!r} (it has {have or 'none'})"
        )
    return named[position]


def source_roles(dest: int, named: Mapping[str, int] | None) -> list[str]:
    """The role of every source position 0..dest, for averaging across prompts of other lengths."""
    roles = ["other"] * (dest + 1)
    roles[0] = "first"
    roles[dest] = "dest"
    for name, at in (named or {}).items():
        if at <= dest:
            roles[at] = name
    return roles


class DFARunner(StoreWriter):
    """One shard's DFA rows."""

    def __init__(self, spec: JobSpec, model: HookedSAETransformer, saes: list[LoadedSAE]):
        assert isinstance(spec.job, DFAParams)
        super().__init__(spec, model)
        self.params = spec.job
        self.site = dfa_site(self.params, [loaded.site for loaded in saes])
        self.saes = [loaded.sae for loaded in saes]

    def compute_shard(
        self,
        store: FeatureStore,
        plan: ShardPlan,
        records: list[PromptRecord],
        context: list[PromptRecord] | None,
    ) -> ShardResult:
        batch, removed = tokenize_capped_counting(self.model, records, self.cap)
        named = named_positions(records, removed)
        rows: list[dict[str, Any]] = []
        for index in range(len(records)):
            length = int(batch.lengths[index])
            where = None if named is None else named[index]
            prompt = plan.start + index
            dest = destination(self.params.position, length, where, prompt)
            results = dfa_features(
                self.model,
                self.saes,
                batch.tokens[index, :length],
                self.site.layer,
                dest,
                features=self.params.features,
                top=self.params.top_features,
            )
            roles = source_roles(dest, where)
            for result in results:
                rows.append(
                    {
                        "prompt": prompt,
                        "dest_pos": dest,
                        "feature": result.feature,
                        "activation": result.activation,
                        "pre_activation": result.pre_activation,
                        "bias": result.bias,
                        # Sources after the destination are masked (always 0): not stored.
                        "contributions": [row[: dest + 1] for row in result.contributions],
                        "roles": roles,
                    }
                )
        token_lists = batch.token_lists()
        entry = store.write_shard(plan.shard_id, records, token_lists, {})
        entry = write_shard_outputs(store, entry, documents={"rows": rows})
        return ShardResult(
            entry=entry.model_dump(mode="json"),
            tokens=sum(len(t) for t in token_lists),
            prompts=len(records),
            truncated=sum(1 for n in removed if n),
            rejected=0,
        )
