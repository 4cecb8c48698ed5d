"""Store-fed attribution: AtP of SAE features and error nodes from a paired cache's values.

An ``attribute`` job with ``prompts: {kind: store, url: CACHE}`` reads, per
committed shard of the cache, the clean entries (``a``, ``g``), the corrupted
entries (``a'``, ``g'`` at the clean point) and the error nodes' AtP terms
(docs/paired_caches.md), and sums per node exactly what a model-run job with
``method: atp`` and nodes ``sae_feature``/``sae_error`` sums: the per-prompt
AtP, its absolute value, and the prompts where the node's position exists.
No model is loaded: one shard's arrays are all a task holds.

A node inactive on both prompts scores exactly 0 in the engine, so a shard
lists only nodes with a non-zero score somewhere, plus how many of its
prompts have each position; the driver gives every node of a position that
count (:func:`merge_store_sums`) and counts the zero nodes without listing
them (``n_nodes`` equals the model-run job's).
"""

from __future__ import annotations

import itertools
import math
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field

from circuitscan.schemas.jobs import AttributeParams, JobSpec, StoreSource
from circuitscan.services.jobs.kinds.attribute.worker import Means, NodeSumsPartial
from circuitscan.services.jobs.spec_checks import JobError

if TYPE_CHECKING:
    from circuitscan.services.store import FeatureStore

STORE_KINDS = ("feature", "sae_error")


class StoreSumsPartial(NodeSumsPartial):
    """A store-fed shard's node sums (non-zero nodes only) and its prompts per position."""

    positions: dict[str, int] = Field(
        description="Position label (index, 'last' or a name) → prompts of the shard having it."
    )


@dataclass(frozen=True)
class StorePlan:
    """What a store-fed job reads: the cache, the sites scored and their widths."""

    source: str
    sites: dict[str, int]  # site label → d_sae, in the job's SAE order
    kinds: tuple[str, ...]  # of STORE_KINDS
    shard_ids: list[int]
    n_prompts: int


def _source_spec(store: FeatureStore) -> dict[str, Any]:
    spec = store.layout.job_spec or {}
    job = spec.get("job")
    if not isinstance(job, dict) or job.get("kind") != "cache":
        raise JobError(f"store {store.url} was not written by a cache job; it has no cached values")
    return spec


def check_store_source(spec: JobSpec, store: FeatureStore) -> StorePlan:
    """Everything a store-fed job needs of its cache, refused with a JobError before any work."""
    assert isinstance(spec.prompts, StoreSource) and isinstance(spec.job, AttributeParams)
    params, url = spec.job, spec.prompts.url
    layout = store.layout
    cached = _source_spec(store)
    if params.method != "atp":
        raise JobError(
            f"store-fed attribution computes plain AtP (the QK fix and GradDrop of AtP* need "
            f"the model); set method: atp (got {params.method!r})"
        )
    other = sorted(set(params.node_kinds) - set(STORE_KINDS))
    if other:
        raise JobError(
            f"a store holds SAE values only: nodes {other} cannot be scored from {url} "
            f"(use nodes {list(STORE_KINDS)}, or a prompt source to run the model)"
        )
    if not layout.gradients:
        raise JobError(
            f"store {url} has no gradients: cache it with gradients: true and paired: true"
        )
    if layout.pairing is None:
        raise JobError(
            f"store {url} has no corrupted activations: cache it with paired: true "
            "(a prompt source with corrupted prompts)"
        )
    if cached.get("metric") != spec.metric.model_dump(mode="json"):
        raise JobError(
            f"store {url} holds gradients of metric {cached.get('metric')}, but this job asks "
            f"for {spec.metric.model_dump(mode='json')}"
        )
    if layout.pairing.align != params.align:
        raise JobError(
            f"store {url} paired positions with align: {layout.pairing.align}, but this job "
            f"asks for align: {params.align}"
        )
    if cached.get("max_prompt_tokens") != spec.max_prompt_tokens:
        raise JobError(
            f"store {url} capped prompts at {cached.get('max_prompt_tokens')} tokens, this job "
            f"at {spec.max_prompt_tokens}: verification would tokenize them differently"
        )
    stored_saes = [dict(item) for item in cached.get("saes", [])]
    labels = [site.label for site in layout.sites]
    sites: dict[str, int] = {}
    for sae in spec.saes:
        dumped = sae.model_dump(mode="json")
        if dumped not in stored_saes:
            raise JobError(
                f"SAE {sae.source!r} is not one of store {url}'s SAEs (its sites: {labels}; "
                f"SAEs: {[item.get('source') for item in stored_saes]})"
            )
        site = layout.sites[stored_saes.index(dumped)]
        sites[site.label] = site.d_sae
    committed = unfinished_check(store, url)
    return StorePlan(
        source=url,
        sites=sites,
        kinds=tuple(kind for kind in STORE_KINDS if kind in params.node_kinds),
        shard_ids=committed,
        n_prompts=store.n_prompts(),
    )


def unfinished_check(store: FeatureStore, url: str) -> list[int]:
    """The committed shard ids of a finished cache; JobError naming what is missing otherwise.

    Only a plan's last shard is short, so a finished cache has shards 0..k-1
    committed, and either its last one short or as many prompts as it loaded
    (``inputs.json``; prompts refused for their length make that an upper bound).
    """
    from circuitscan.services.jobs.input_digest import _stored

    entries = store.committed_entries()
    ids = sorted(entries)
    gaps = sorted(set(range(ids[-1] + 1)) - set(ids)) if ids else []
    inputs = _stored(store.location, url)
    loaded = inputs.prompts if inputs is not None else None
    done = bool(ids) and not gaps
    if done and entries[ids[-1]].n_prompts == store.layout.shard_size and loaded is not None:
        done = store.n_prompts() >= loaded
    if not done:
        what = (
            f"shards {gaps[:10]} are not committed"
            if gaps
            else (
                f"{store.n_prompts()} of its {loaded} prompts are committed"
                if ids
                else "no shard is committed"
            )
        )
        raise JobError(
            f"store {url} is not finished: {what} (circuitscan resume {url} finishes it)"
        )
    return ids


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenated ``range(start, start + count)`` for each pair, vectorised."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(counts)
    offsets = np.repeat(starts - (ends - counts), counts)
    return offsets + np.arange(total, dtype=np.int64)


def _selections(
    positions: AttributeParams, lengths: np.ndarray, named: list[dict[str, int]]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(token in shard, label id) of every scored (prompt, position), and the labels."""
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    spec = positions.positions
    if spec == "all":
        width = int(lengths.max())
        index = _ranges(starts, lengths.astype(np.int64))
        local = index - np.repeat(starts, lengths.astype(np.int64))
        return index, local, [str(p) for p in range(width)]
    labels = ["last"] if spec == "last" else list(spec)
    tokens, ids = [], []
    for column, label in enumerate(labels):
        for prompt, start in enumerate(starts.tolist()):
            if label == "last":
                at = int(lengths[prompt]) - 1
            elif label in named[prompt] and 0 <= named[prompt][label] < int(lengths[prompt]):
                at = named[prompt][label]
            else:
                raise JobError(f"prompt {prompt} of the shard has no named position {label!r}")
            tokens.append(start + at)
            ids.append(column)
    return np.asarray(tokens, dtype=np.int64), np.asarray(ids, dtype=np.int64), labels


def shard_sums(
    store: FeatureStore, shard_id: int, params: AttributeParams, plan: StorePlan
) -> StoreSumsPartial:
    """One committed shard's per-node AtP sums, from its stored values (float64 sums)."""
    prompts = store.prompt_shard(shard_id)
    offsets = prompts.prompt_offsets
    lengths = np.diff(offsets).astype(np.int64)
    pairs = store.shard_pairs(shard_id)
    sel_token, sel_label, labels = _selections(params, lengths, pairs.named_positions)
    n_labels = len(labels)
    names: list[str] = []
    sums: list[np.ndarray] = []
    sums_abs: list[np.ndarray] = []
    for label_site, d_sae in plan.sites.items():
        clean = store.site_shard(shard_id, label_site)
        side = store.paired_site_shard(shard_id, label_site)
        if "feature" in plan.kinds:
            assert clean.gradients is not None
            keys, values = [], []
            for offs, ids, a, g, sign in (
                (clean.token_offsets, clean.feature_ids, clean.activations, clean.gradients, -1.0),
                (side.token_offsets, side.feature_ids, side.activations, side.gradients, 1.0),
            ):
                counts = offs[sel_token + 1] - offs[sel_token]
                entries = _ranges(offs[sel_token], counts)
                selection = np.repeat(np.arange(sel_token.size), counts)
                keys.append(selection * d_sae + ids[entries].astype(np.int64))
                values.append(sign * a[entries].astype(np.float64) * g[entries].astype(np.float64))
            key, inverse = np.unique(np.concatenate(keys), return_inverse=True)
            per_pair = np.bincount(inverse, weights=np.concatenate(values), minlength=key.size)
            node = sel_label[key // d_sae] * d_sae + key % d_sae
            node_key, node_inv = np.unique(node, return_inverse=True)
            total = np.bincount(node_inv, weights=per_pair, minlength=node_key.size)
            total_abs = np.bincount(node_inv, weights=np.abs(per_pair), minlength=node_key.size)
            keep = total_abs > 0
            names += [
                f"feature:{label_site}:{k % d_sae}@{labels[k // d_sae]}"
                for k in node_key[keep].tolist()
            ]
            sums.append(total[keep])
            sums_abs.append(total_abs[keep])
        if "sae_error" in plan.kinds:
            terms = side.error_atp[sel_token].astype(np.float64)
            total = np.bincount(sel_label, weights=terms, minlength=n_labels)
            total_abs = np.bincount(sel_label, weights=np.abs(terms), minlength=n_labels)
            scored = np.flatnonzero(total_abs > 0)
            names += [f"sae_error:{label_site}@{labels[k]}" for k in scored.tolist()]
            sums.append(total[scored])
            sums_abs.append(total_abs[scored])
    having = Counter(sel_label.tolist())  # each selection is one prompt's position
    label_counts = {labels[i]: int(n) for i, n in sorted(having.items())}
    counts = np.asarray([label_counts[name.rsplit("@", 1)[1]] for name in names], dtype=np.int64)
    return StoreSumsPartial(
        nodes=names,
        node_sum=np.concatenate(sums) if sums else np.zeros(0),
        node_sum_abs=np.concatenate(sums_abs) if sums_abs else np.zeros(0),
        node_count=counts,
        positions=label_counts,
    )


def merge_store_sums(
    partials: Iterable[StoreSumsPartial], plan: StorePlan, want: int
) -> tuple[Means, int]:
    """(node → (mean, mean |·|, prompts), number of nodes scored) over the shards.

    Every node of a position counts every prompt having it; nodes no shard
    listed score exactly 0. When fewer than ``want`` nodes are non-zero, the
    zero ones are added by name, as the model-run ranking orders its ties.
    """
    total: dict[str, list[float]] = {}
    having: Counter[str] = Counter()
    for part in partials:
        having.update(part.positions)
        for i, name in enumerate(part.nodes):
            slot = total.setdefault(name, [0.0, 0.0])
            slot[0] += float(part.node_sum[i])
            slot[1] += float(part.node_sum_abs[i])
    per_label = sum(
        (d_sae if "feature" in plan.kinds else 0) + (1 if "sae_error" in plan.kinds else 0)
        for d_sae in plan.sites.values()
    )
    n_nodes = per_label * len(having)
    means: Means = {}
    for name, (s, a) in total.items():
        n = having[name.rsplit("@", 1)[1]]
        means[name] = (s / n, a / n, n) if n else (math.nan, math.nan, 0)
    if len(means) < want:
        for name in sorted(_all_nodes(plan, list(having))):
            if len(means) >= want:
                break
            if name not in means:
                means[name] = (0.0, 0.0, having[name.rsplit("@", 1)[1]])
    return means, n_nodes


def _all_nodes(plan: StorePlan, labels: list[str]) -> Iterable[str]:
    for site, d_sae in plan.sites.items():
        for label in labels:
            if "feature" in plan.kinds:
                yield from (f"feature:{site}:{i}@{label}" for i in range(d_sae))
            if "sae_error" in plan.kinds:
                yield f"sae_error:{site}@{label}"


# --- the estimate task and the source it reads ---------------------------------------


def open_source(spec: JobSpec) -> tuple[FeatureStore, StorePlan]:
    """The cache a store-fed job reads and what it reads of it (JobError before any work)."""
    if not isinstance(spec.prompts, StoreSource):
        raise TypeError("not a store-fed job")
    if not isinstance(spec.job, AttributeParams):
        raise JobError(
            f"store prompts feed attribute jobs (AtP from cached values); a {spec.job.kind} "
            f"job needs a prompt source (text, jsonl, dataset, ioi, template)"
        )
    from circuitscan.services.store import FeatureStore, StoreError
    from circuitscan.services.store.errors import StoreNotFoundError

    try:
        source = FeatureStore.open(spec.prompts.url)
    except StoreNotFoundError as exc:
        raise JobError(f"prompts: no cache store at {spec.prompts.url}") from exc
    except StoreError as exc:
        raise JobError(str(exc)) from exc
    return source, check_store_source(spec, source)


def estimate_shard(spec_json: str, shard_id: int) -> dict[str, Any]:
    """One cache shard → its node sums, written as that shard of the job's store (a Ray task)."""
    import ray

    from circuitscan.services.store import FeatureStore
    from circuitscan.services.store.results import write_shard_outputs

    spec = JobSpec.model_validate_json(spec_json)
    started = time.perf_counter()
    out = FeatureStore.open(spec.store)
    committed = out.committed_entry(shard_id)
    if committed is not None:  # a retry of a task whose shard made it
        return {"entry": committed.model_dump(mode="json"), "tokens": committed.n_tokens}
    source, plan = open_source(spec)
    assert isinstance(spec.job, AttributeParams)
    partial = shard_sums(source, shard_id, spec.job, plan)
    records = source.prompt_records(shard_id)
    prompts = source.prompt_shard(shard_id)
    offsets = prompts.prompt_offsets
    tokens = [prompts.token_ids[a:b].tolist() for a, b in itertools.pairwise(offsets)]
    entry = out.write_shard(shard_id, records, tokens, {})
    arrays, documents = partial.to_outputs()
    entry = write_shard_outputs(out, entry, arrays=arrays, documents=documents)
    return {
        "entry": entry.model_dump(mode="json"),
        "tokens": entry.n_tokens,
        "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else "",
        "seconds": time.perf_counter() - started,
    }
