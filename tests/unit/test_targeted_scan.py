"""Targeted ablation scans on a tiny float64 model: candidates from a real cache store, each
round run by the kind's own shard runner in this process (the workers' code without Ray)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from circuitscan.pipelines.attribution import ablation_scan
from circuitscan.pipelines.batching import tokenize_prompts
from circuitscan.pipelines.paired_caching import cache_pairs
from circuitscan.pipelines.tasks.ioi import generate_ioi
from circuitscan.schemas.hooks import HookSite
from circuitscan.schemas.jobs import AblationScanParams, IOISource, JobSpec, ScanCandidates
from circuitscan.schemas.metrics import MetricSpec
from circuitscan.schemas.store import SiteLayout, StoreLayout
from circuitscan.services.jobs.job_kind import KindCheckError, MergeContext
from circuitscan.services.jobs.kinds import job_kind
from circuitscan.services.jobs.kinds.ablation_scan import AblationRunner
from circuitscan.services.jobs.kinds.targeted_scan import cache_estimates
from circuitscan.services.jobs.worker import WorkerInfo
from circuitscan.services.sae_loading import LoadedSAE
from circuitscan.services.store import FeatureStore, features_at
from circuitscan.testing import build_tiny_language_model, build_tiny_sae, write_tiny_store

SITE = HookSite(layer=1, point="resid_pre")


@pytest.fixture(scope="module")
def setup() -> Any:
    """A float64 tiny model, one SAE, 12 IOI prompts, their cache store and the full scan."""
    model = build_tiny_language_model(seed=3)
    sae = build_tiny_sae(model, SITE, d_sae=24, seed=1)
    records = generate_ioi(model.tokenizer, 12, seed=2)
    url = write_tiny_store("memory://targeted-cache", model, [sae], records, shard_size=5)
    batch = tokenize_prompts(model, records)
    full = ablation_scan(
        model, sae, SITE, batch.tokens, batch.lengths, MetricSpec(), batch.answer, batch.wrong,
        positions="last",
    )  # fmt: skip
    return model, sae, records, url, batch, full


def _spec(url: str, **candidates: Any) -> JobSpec:
    return JobSpec(
        saes=[{"source": "default/L15.resid_post"}],
        prompts=IOISource(kind="ioi", n=12, seed=2),
        job=AblationScanParams(
            kind="ablation_scan",
            site=SITE.label,
            positions="last",
            batch_size=7,
            candidates=ScanCandidates(store=url, **candidates),
        ),
        store="memory://unused",
        shard_size=5,
    )


def _targeted(setup: Any, **candidates: Any) -> Any:
    model, sae, records, url, _, _ = setup
    spec = _spec(url, **candidates)
    runner = AblationRunner(spec, model, [LoadedSAE(sae, SITE, "", SITE.label, None)])
    calls: list[int] = []

    def fan_out(method: str, args: list[tuple[Any, ...]]) -> list[Any]:
        calls.append(len(args))
        return [getattr(runner, method)(*call) for call in args]

    ctx = MergeContext(
        spec=spec, n_prompts=len(records), kept=records, site=SITE.label,
        say=lambda _line: None, fan_out=fan_out,
    )  # fmt: skip
    return job_kind("ablation_scan").merge(spec.job, [], ctx), calls


def _full_means(full: Any) -> dict[int, tuple[float, float]]:
    delta = full.delta.double()
    return {
        f: (float(delta[:, c].mean()), float(delta[:, c].abs().mean()))
        for c, f in enumerate(full.features.tolist())
    }


def test_estimates_are_the_cache_entries_minus_a_times_g_at_the_last_token(setup) -> None:
    _, _, records, url, _, _ = setup
    estimates = cache_estimates(ScanCandidates(store=url), SITE.label, "last")
    store = FeatureStore.open(url)
    total = np.zeros(24)
    for prompt in range(len(records)):
        tokens = store.prompt_tokens(prompt)
        found = features_at(store, SITE.label, prompt, len(tokens) - 1)
        assert found.attributions is not None
        for feature, term in zip(found.feature_ids, found.attributions, strict=True):
            total[feature] -= term
    np.testing.assert_allclose(estimates.total, total, rtol=1e-12, atol=1e-15)
    assert estimates.n_prompts == len(records)


def test_targeted_scan_exact_values_are_the_full_scans_and_its_top_k_too(setup) -> None:
    full = setup[5]
    result, calls = _targeted(setup, top_k=3, patience=4, round_size=2)
    info = result.targeted
    assert info is not None and info.stop_rule == "patience"
    exact = _full_means(full)
    assert info.n_candidates == len(exact) and info.full_scan_ablations == full.n_ablations
    assert info.n_ablated < info.n_candidates and info.stopped_after <= info.n_ablated
    assert len(calls) == -(-info.n_ablated // 2) and set(calls) == {3}  # rounds × 3 shards
    for f in result.features:  # every ablated feature: the full scan's values
        assert (f.mean_delta, f.mean_abs_delta) == pytest.approx(exact[f.feature], abs=1e-12)
        assert f.estimate_mean is not None and f.estimate_mean_abs is not None
    top = sorted(exact, key=lambda f: (-exact[f][1], f))[:3]
    assert [f.feature for f in result.features[:3]] == top
    assert result.n_ablations < full.n_ablations
    assert info.ablation_fraction == pytest.approx(result.n_ablations / full.n_ablations)
    assert result.baseline_mean == pytest.approx(float(full.baseline.mean()), abs=1e-12)


def test_targeted_scan_budget_and_exhaustion(setup) -> None:
    result, _ = _targeted(setup, top_k=2, patience=50, budget=3, round_size=2)
    assert result.targeted.stop_rule == "budget" and result.targeted.stopped_after == 3
    assert result.targeted.n_ablated == 3
    every, _ = _targeted(setup, top_k=2, patience=500, round_size=50)
    assert every.targeted.stop_rule == "exhausted"
    exact = _full_means(setup[5])
    assert {f.feature for f in every.features} == set(exact)
    assert every.n_ablations == setup[5].n_ablations


def test_the_gap_rule_stops_once_no_estimate_left_can_reach_the_top_k(setup) -> None:
    exact = _full_means(setup[5])
    top = sorted(exact, key=lambda f: (-exact[f][1], f))[:3]
    estimates = cache_estimates(ScanCandidates(store=setup[3]), SITE.label, "last")
    order, n = estimates.order(), estimates.n_prompts
    # A gap the estimates cannot meet never fires; a tiny one fires at the K-th candidate.
    never, _ = _targeted(setup, top_k=3, patience=500, round_size=1, gap=1e12)
    assert never.targeted.stop_rule == "exhausted" and never.targeted.gap_ratio == 1e12
    early, _ = _targeted(setup, top_k=3, patience=500, round_size=1, gap=1e-12)
    assert (early.targeted.stop_rule, early.targeted.stopped_after) == ("gap", 3)
    result, _ = _targeted(setup, top_k=3, patience=500, round_size=1, gap="auto")
    info = result.targeted
    assert info.stop_rule == "gap" and info.gap == "auto" and info.n_ablated < len(order)
    ablated = [f.feature for f in result.features]
    assert sorted(ablated) == sorted(order[: info.n_ablated])  # whole features, in order
    # The rule as stated: the worst exact/estimate ratio seen, times the next estimate,
    # is reached by the exact third largest, and was not one candidate earlier.
    ratio = max(exact[f][1] / (estimates.total_abs[f] / n) for f in ablated)
    assert info.gap_ratio == pytest.approx(ratio)
    kth = sorted((exact[f][1] for f in ablated), reverse=True)[2]
    assert kth >= ratio * estimates.total_abs[order[info.stopped_after]] / n
    for f in result.features:  # exact values: the full scan's, on every prompt
        assert (f.mean_delta, f.mean_abs_delta) == pytest.approx(exact[f.feature], abs=1e-12)
    assert [f.feature for f in result.features[:3]] == top


def _info(fingerprint: str = "") -> WorkerInfo:
    return WorkerInfo(
        model_name="tiny", model_fingerprint=fingerprint, sae_fingerprints={SITE.label: ""},
        sae_widths={SITE.label: 24}, sae_hooks={SITE.label: SITE.hook_name}, n_ctx=64,
        node_id="", pid=0,
    )  # fmt: skip


def test_a_candidates_store_that_cannot_rank_is_refused_before_any_work(setup) -> None:
    _, _, records, url, _, _ = setup
    kind = job_kind("ablation_scan")
    no_grads = "memory://targeted-no-gradients"
    layout = StoreLayout(
        sites=[SiteLayout(label=SITE.label, hook_name=SITE.hook_name, d_sae=24)], gradients=False
    )
    FeatureStore.create(no_grads, layout, overwrite=True)
    with pytest.raises(KindCheckError, match="keeps no gradients"):
        kind.check_sites(_spec(no_grads), _info())
    with pytest.raises(KindCheckError, match="no feature store at memory://nowhere"):
        kind.check_sites(_spec("memory://nowhere"), _info())
    with pytest.raises(KindCheckError, match="another model"):
        kind.check_sites(_spec(url), _info("other-model"))
    with pytest.raises(KindCheckError, match="holds 12 prompts, this scan has 11"):
        kind.check_prompts(_spec(url).job, records[:11])
    swapped = [records[1], records[0], *records[2:]]
    with pytest.raises(KindCheckError, match="prompt 0 differs"):
        kind.check_prompts(_spec(url).job, swapped)
    kind.check_prompts(_spec(url).job, records)  # the cache's own prompts pass
    with pytest.raises(ValueError, match="needs mode: zero"):
        AblationScanParams(kind="ablation_scan", mode="mean", candidates={"store": url})


def test_only_restricts_a_scan_to_the_features_given(setup) -> None:
    model, sae, _, _, batch, full = setup
    chosen = full.features[[0, 2]]
    part = ablation_scan(
        model, sae, SITE, batch.tokens, batch.lengths, MetricSpec(), batch.answer, batch.wrong,
        positions="last", only=chosen, batch_size=3,
    )  # fmt: skip
    assert part.features.tolist() == sorted(chosen.tolist())
    columns = [full.features.tolist().index(f) for f in part.features.tolist()]
    torch.testing.assert_close(part.delta, full.delta[:, columns], rtol=0, atol=1e-12)
    empty = ablation_scan(
        model, sae, SITE, batch.tokens, batch.lengths, MetricSpec(), batch.answer, batch.wrong,
        positions="last", only=torch.zeros(0, dtype=torch.long),
    )  # fmt: skip
    assert empty.n_ablations == 0 and torch.allclose(empty.baseline, full.baseline)


# --- corrupted-value patching: candidates by the AtP term of a paired cache -------------------


def _write_paired_store(url: str, model: Any, sae: Any, records: list, shard_size: int) -> str:
    """A paired cache of ``records`` (clean + corrupted pass per shard), as the cache job writes."""
    from circuitscan.pipelines.caching import site_label
    from circuitscan.pipelines.sae_splice import sae_hook_name
    from circuitscan.schemas.store import PairingLayout
    from circuitscan.services.store.paired_io import shard_pairs

    layout = StoreLayout(
        sites=[SiteLayout(label=site_label(sae), hook_name=sae_hook_name(sae), d_sae=24)],
        shard_size=shard_size,
        job_spec={"metric": MetricSpec().model_dump(mode="json")},
        pairing=PairingLayout(align="same"),
    )
    store = FeatureStore.create(url, layout, overwrite=True)
    for shard_id in range(-(-len(records) // shard_size)):
        shard = records[shard_id * shard_size : (shard_id + 1) * shard_size]
        clean = tokenize_prompts(model, shard)
        corrupt = tokenize_prompts(
            model, [r.model_copy(update={"text": r.corrupted}) for r in shard]
        )
        sites, paired = cache_pairs(
            model, [sae], clean.tokens, clean.lengths, corrupt.tokens, corrupt.lengths,
            MetricSpec(), answer=clean.answer, wrong=clean.wrong,
        )  # fmt: skip
        pairs = shard_pairs(None, paired, len(shard))
        store.commit_shard(store.write_shard(shard_id, shard, clean.token_lists(), sites, pairs))
    store.flush_index()
    return url


@pytest.fixture(scope="module")
def paired(setup) -> Any:
    """The same model, SAE and prompts, their paired cache and the full corrupted-patch scan."""
    model, sae, records, _, batch, _ = setup
    url = _write_paired_store("memory://targeted-paired", model, sae, records, 5)
    corrupt = tokenize_prompts(model, [r.model_copy(update={"text": r.corrupted}) for r in records])
    full = ablation_scan(
        model, sae, SITE, batch.tokens, batch.lengths, MetricSpec(), batch.answer, batch.wrong,
        mode="corrupted", positions="last", corrupt_tokens=corrupt.tokens,
        corrupt_lengths=corrupt.lengths, batch_size=16,
    )  # fmt: skip
    return url, corrupt, full


def _corrupted_spec(url: str, align: str = "same", **candidates: Any) -> JobSpec:
    spec = _spec(url, **candidates)
    job = spec.job.model_copy(update={"mode": "corrupted", "align": align})
    return spec.model_copy(update={"job": AblationScanParams.model_validate(job.model_dump())})


def _targeted_corrupted(setup: Any, url: str, **candidates: Any) -> Any:
    model, sae, records, _, _, _ = setup
    spec = _corrupted_spec(url, **candidates)
    runner = AblationRunner(spec, model, [LoadedSAE(sae, SITE, "", SITE.label, None)])

    def fan_out(method: str, args: list[tuple[Any, ...]]) -> list[Any]:
        return [getattr(runner, method)(*call) for call in args]

    ctx = MergeContext(
        spec=spec, n_prompts=len(records), kept=records, site=SITE.label,
        say=lambda _line: None, fan_out=fan_out,
    )  # fmt: skip
    return job_kind("ablation_scan").merge(spec.job, [], ctx)


def test_a_corrupted_patch_is_the_exact_patch_of_the_feature_node_to_its_corrupted_value(
    setup, paired
) -> None:
    from circuitscan.pipelines.attribution import exact_patch
    from circuitscan.schemas.attribution import Node

    model, sae, _, _, batch, _ = setup
    _, corrupt, full = paired
    assert full.n_ablations > 0 and full.features.numel() > 3
    nodes = [
        Node(kind="feature", layer=SITE.layer, point=SITE.point, index=f, position="last")
        for f in full.features.tolist()
    ]
    exact = exact_patch(
        model, {SITE: sae}, batch.tokens, batch.lengths, MetricSpec(), batch.answer, batch.wrong,
        nodes, mode="corrupt", corrupt_tokens=corrupt.tokens, corrupt_lengths=corrupt.lengths,
    )  # fmt: skip
    # Pairs the scan did not run (a′ = a at the last token) are exactly 0 in both.
    torch.testing.assert_close(full.delta, exact, rtol=0, atol=1e-10)
    assert bool((full.delta != 0).any())


def test_corrupted_estimates_are_the_paired_cache_atp_term_at_the_last_token(paired) -> None:
    url = paired[0]
    estimates = cache_estimates(ScanCandidates(store=url), SITE.label, "last", "corrupted")
    store = FeatureStore.open(url)
    total, total_abs, pairs = np.zeros(24), np.zeros(24), np.zeros(24, dtype=np.int64)
    for shard_id in sorted(store.committed_entries()):
        clean, other = (
            store.site_shard(shard_id, SITE.label),
            store.paired_site_shard(shard_id, SITE.label),
        )
        offsets = store.prompt_shard(shard_id).prompt_offsets
        for local in range(len(offsets) - 1):
            last = int(offsets[local + 1]) - 1
            atp: dict[int, float] = {}
            value: dict[int, float] = {}
            for side, sign in ((clean, -1.0), (other, 1.0)):
                lo, hi = int(side.token_offsets[last]), int(side.token_offsets[last + 1])
                for i in range(lo, hi):
                    f = int(side.feature_ids[i])
                    a, g = float(side.activations[i]), float(side.gradients[i])
                    atp[f] = atp.get(f, 0.0) + sign * a * g
                    value[f] = value.get(f, 0.0) + sign * a
            for f, term in atp.items():
                if value[f] != 0:
                    total[f] += term
                    total_abs[f] += abs(term)
                    pairs[f] += 1
    np.testing.assert_allclose(estimates.total, total, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(estimates.total_abs, total_abs, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(estimates.pairs, pairs)
    # The cache's pairs are the full corrupted scan's (float16 keeps a′ ≠ a apart here).
    assert int(pairs.sum()) == paired[2].n_ablations


def test_targeted_corrupted_scan_exact_values_and_top_k_are_the_full_scans(setup, paired) -> None:
    url, _, full = paired
    exact = _full_means(full)
    result = _targeted_corrupted(setup, url, top_k=3, patience=3, round_size=2)
    info = result.targeted
    assert result.mode == "corrupted" and info is not None and info.stop_rule == "patience"
    assert info.n_candidates == len(exact) and info.full_scan_ablations == full.n_ablations
    assert info.n_ablated < info.n_candidates
    for f in result.features:  # every patched feature: the full corrupted scan's values
        assert (f.mean_delta, f.mean_abs_delta) == pytest.approx(exact[f.feature], abs=1e-12)
        assert f.n_prompts == len(setup[2]) and f.estimate_mean is not None
    top = sorted(exact, key=lambda f: (-exact[f][1], f))[:3]
    assert [f.feature for f in result.features[:3]] == top
    assert result.n_ablations < full.n_ablations
    assert info.ablation_fraction == pytest.approx(result.n_ablations / full.n_ablations)
    every = _targeted_corrupted(setup, url, top_k=3, patience=500, round_size=50, gap="auto")
    assert every.targeted.stop_rule in ("gap", "exhausted")
    assert [f.feature for f in every.features[:3]] == top


def test_a_corrupted_targeted_scan_refuses_what_cannot_rank_it(setup, paired) -> None:
    _, _, records, plain, _, _ = setup
    url = paired[0]
    kind = job_kind("ablation_scan")
    with pytest.raises(KindCheckError, match=r"plain cache .* paired: true"):
        kind.check_sites(_corrupted_spec(plain), _info())
    with pytest.raises(KindCheckError, match="align: same, this scan with align: end"):
        kind.check_sites(_corrupted_spec(url, align="end"), _info())
    other = _corrupted_spec(url).model_copy(update={"metric": MetricSpec(kind="next_token_loss")})
    with pytest.raises(KindCheckError, match="holds gradients of metric"):
        kind.check_sites(other, _info())
    kind.check_sites(_corrupted_spec(url), _info())
    unpaired = [records[0].model_copy(update={"corrupted": None}), *records[1:]]
    with pytest.raises(KindCheckError, match="1 of 12 prompts have none"):
        kind.check_prompts(_corrupted_spec(url).job, unpaired)
    swapped = [records[0].model_copy(update={"corrupted": records[1].corrupted}), *records[1:]]
    with pytest.raises(KindCheckError, match="another corrupted version of prompt 0"):
        kind.check_prompts(_corrupted_spec(url).job, swapped)
    kind.check_prompts(_corrupted_spec(url).job, records)
    with pytest.raises(ValueError, match="needs mode: corrupted"):
        AblationScanParams(kind="ablation_scan", align="end")
    # Other scans dump (and hash) as before corrupted mode existed.
    assert "align" not in AblationScanParams(kind="ablation_scan").model_dump()


def test_an_end_aligned_corrupted_patch_is_the_exact_patch_through_the_same_map(setup) -> None:
    from circuitscan.pipelines.attribution import exact_patch
    from circuitscan.pipelines.attribution.positions import PositionError, end_aligned_map
    from circuitscan.schemas.attribution import Node

    model, sae, records, _, _, _ = setup
    # Corrupted texts longer early on: only counting from the end pairs them.
    longer = [r.model_copy(update={"text": "Then, later " + r.corrupted}) for r in records[:6]]
    corrupt = tokenize_prompts(model, longer)
    clean = tokenize_prompts(model, records[:6])
    assert bool((corrupt.lengths > clean.lengths).all())
    position_map = end_aligned_map(clean.lengths, corrupt.lengths, clean.tokens.shape[1])
    args = (model, sae, SITE, clean.tokens, clean.lengths, MetricSpec(), clean.answer, clean.wrong)
    kwargs = {"corrupt_tokens": corrupt.tokens, "corrupt_lengths": corrupt.lengths}
    scan = ablation_scan(
        *args, mode="corrupted", positions="last", position_map=position_map, **kwargs
    )
    assert scan.features.numel() > 3
    nodes = [
        Node(kind="feature", layer=SITE.layer, point=SITE.point, index=f, position="last")
        for f in scan.features.tolist()
    ]
    exact = exact_patch(
        model, {SITE: sae}, clean.tokens, clean.lengths, MetricSpec(), clean.answer,
        clean.wrong, nodes, mode="corrupt", position_map=position_map, **kwargs,
    )  # fmt: skip
    torch.testing.assert_close(scan.delta, exact, rtol=0, atol=1e-10)
    assert bool((scan.delta != 0).any())
    with pytest.raises(PositionError, match="different token lengths"):
        ablation_scan(*args, mode="corrupted", positions="last", **kwargs)


# --- pair-level scans: candidates are (prompt, feature) pairs -------------------------------


def _pairs(setup: Any, **candidates: Any) -> tuple[Any, Any, Any]:
    """A pair-level scan's rounds run by the kind's shard runner here: (the scan with every
    pair's exact Δm, the cache's pair estimates, how many ablate_features calls it made)."""
    from circuitscan.services.jobs.kinds.targeted_pairs import actor_rounds, run_pairs
    from circuitscan.services.jobs.planning import plan_shards

    model, sae, records, url, _, _ = setup
    spec = _spec(url, granularity="pair", **candidates)
    runner = AblationRunner(spec, model, [LoadedSAE(sae, SITE, "", SITE.label, None)])
    estimates = cache_estimates(spec.job.candidates, SITE.label, "last", keep_pairs=True)
    calls: list[int] = []

    def fan_out(method: str, args: list[tuple[Any, ...]]) -> list[Any]:
        calls.append(len(args))
        return [getattr(runner, method)(*call) for call in args]

    rounds = actor_rounds(estimates, plan_shards(len(records), 5), records, fan_out, lambda _: None)
    return run_pairs(spec.job, estimates, rounds), estimates, calls


def test_pair_estimates_sum_to_the_feature_estimates(setup) -> None:
    estimates = cache_estimates(ScanCandidates(store=setup[3]), SITE.label, "last", keep_pairs=True)
    d = estimates.pairs.shape[0]
    assert estimates.pair_estimate.shape[0] == int(estimates.pairs.sum())
    per = np.bincount(estimates.pair_feature, weights=estimates.pair_estimate, minlength=d)
    np.testing.assert_allclose(per, estimates.total, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(np.bincount(estimates.pair_feature, minlength=d), estimates.pairs)


def test_pair_scan_exact_values_are_the_full_scans_pair_by_pair(setup) -> None:
    from circuitscan.services.jobs.kinds.targeted_pairs import pair_features

    full = setup[5]
    scan, estimates, _ = _pairs(setup, top_k=3, patience=20, round_size=8, gap="auto")
    column = {f: c for c, f in enumerate(full.features.tolist())}
    done = np.flatnonzero(~np.isnan(scan.exact))
    assert 0 < done.shape[0] < scan.exact.shape[0]
    for pair in done.tolist():  # every ablated pair: the full scan's Δm for it
        p, f = int(estimates.pair_prompt[pair]), int(estimates.pair_feature[pair])
        assert scan.exact[pair] == pytest.approx(float(full.delta[p, column[f]]), abs=1e-12)
    # Within a feature, ablated first: each ablated pair's |estimate| is at least each of the
    # feature's estimated pairs', so its exact pairs are its n_exact largest.
    size = np.abs(estimates.pair_estimate)
    info = scan.info
    assert info.granularity == "pair" and info.gap_ratio_low <= 1 <= info.gap_ratio
    for feature in np.unique(estimates.pair_feature).tolist():
        mine = estimates.pair_feature == feature
        ablated, left = size[mine & ~np.isnan(scan.exact)], size[mine & np.isnan(scan.exact)]
        if ablated.size and left.size:
            assert ablated.min() >= left.max()
    assert scan.n_ablations == done.shape[0] == info.n_ablated
    assert info.full_scan_ablations == full.n_ablations
    # The job's result (its merge, the same rounds): a feature's reported mean is its exact
    # pairs plus its estimated pairs, over all prompts, and the baseline is the clean metric.
    result, _ = _targeted(setup, granularity="pair", top_k=3, patience=20, round_size=8, gap="auto")
    assert result.targeted == info and result.n_ablations == scan.n_ablations
    assert result.features == pair_features(SITE.label, estimates, scan)
    value = np.where(np.isnan(scan.exact), estimates.pair_estimate, scan.exact)
    for f in result.features:
        mine = estimates.pair_feature == f.feature
        assert f.mean_delta == pytest.approx(value[mine].sum() / 12, abs=1e-12)
        assert f.mean_abs_delta == pytest.approx(np.abs(value[mine]).sum() / 12, abs=1e-12)
        assert f.n_exact == int((mine & ~np.isnan(scan.exact)).sum())
    assert result.baseline_mean == pytest.approx(float(full.baseline.mean()), abs=1e-12)
    exact = _full_means(full)
    top = sorted(exact, key=lambda f: (-exact[f][1], f))[:3]
    assert info.stop_rule == "gap" and info.n_ablated < info.n_candidates
    assert sorted(f.feature for f in result.features[:3]) == sorted(top)
    assert any(f.n_exact < f.n_active for f in result.features)  # some pairs estimated
    # The CLI says how many of each feature's pairs are exact, and what the rest are.
    view = job_kind("ablation_scan").cli_view(result, 5)
    assert view.columns[-1] == "exact" and "estimates" in view.header and "pairs" in view.header
    assert [row[-1] for row in view.rows] == [
        f"{f.n_exact}/{f.n_active}" for f in result.features[:5]
    ]


def test_pair_scan_exhausted_and_budget(setup) -> None:
    exact = _full_means(setup[5])
    every, estimates, _ = _pairs(setup, top_k=3, patience=10_000, round_size=64, gap="auto")
    assert every.info.stop_rule == "exhausted" and every.n_ablations == setup[5].n_ablations
    from circuitscan.services.jobs.kinds.targeted_pairs import pair_features

    for f in pair_features(SITE.label, estimates, every):  # every value exact: the full scan's
        assert (f.mean_delta, f.mean_abs_delta) == pytest.approx(exact[f.feature], abs=1e-12)
        assert f.n_exact == f.n_active
    budget, _, _ = _pairs(setup, top_k=3, patience=10_000, round_size=4, budget=6, gap="auto")
    assert (budget.info.stop_rule, budget.n_ablations, budget.info.n_ablated) == ("budget", 6, 6)


def test_pair_scan_gap_bound_as_stated(setup) -> None:
    from circuitscan.services.jobs.kinds.targeted_pairs import _Tally, pair_order

    scan, estimates, _ = _pairs(setup, top_k=2, patience=1, round_size=8, gap=1.0)
    info = scan.info
    assert info.stop_rule == "gap" and info.gap_ratio == 1.0
    # gap 1: an estimated pair's |Δm| is taken to be its |estimate| exactly. At the stop each
    # top-2 feature's exact part plus estimated part reaches every other feature's, and the
    # top 2 did not change at that pair; at no pair before did the two both hold.
    order = pair_order(estimates)
    tally, tops, bound = _Tally(estimates, 2), [], []
    tops.append(tally.top())
    for pair in order[: info.stopped_after].tolist():
        slot = int(tally.slot[estimates.pair_feature[pair]])
        tally.add(slot, float(estimates.pair_estimate[pair]), float(scan.exact[pair]))
        tops.append(tally.top())
        bound.append(tally.unsettled(tops[-1], (1.0, 1.0)).shape[0] == 0)
        reported = tally.reported_abs()
        inside = np.isin(np.arange(reported.shape[0]), tops[-1])
        assert bound[-1] == bool(reported[inside].min() >= reported[~inside].max())
    held = [b and np.array_equal(t, u) for b, t, u in zip(bound, tops[1:], tops[:-1], strict=True)]
    assert held[-1] and not any(held[:-1])


def test_pair_granularity_is_checked_and_feature_scans_dump_as_before(setup) -> None:
    with pytest.raises(ValueError, match="granularity"):
        ScanCandidates(store="memory://x", granularity="token")
    with pytest.raises(ValueError, match="granularity: pair needs gap"):
        ScanCandidates(store="memory://x", granularity="pair")
    with pytest.raises(ValueError, match="gap must be at least 1"):
        ScanCandidates(store="memory://x", granularity="pair", gap=0.5)
    assert "granularity" not in ScanCandidates(store="memory://x").model_dump()
    pairs = ScanCandidates(store="memory://x", granularity="pair", gap="auto")
    assert pairs.model_dump()["granularity"] == "pair"
