"""Feature pages: the directions' maths by intervention, the page against the store, the export.

Tiny float64 models: the logit effects are the logit change of adding the unit
decoder direction to the final residual stream (final norm's scale frozen), the
reading gains the value-path change of adding it before a later layer's
attention (input norm's scale frozen); the page's per-token values and histogram
are what the store holds; the Neuronpedia export validates against the
schemas and carries the store's values.
"""

from __future__ import annotations

import gzip
import json
import shutil

import jsonschema
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from circuitscan.pipelines.analyses.feature_directions import (
    feature_directions,
    residual_directions,
)
from circuitscan.pipelines.batching import tokenize_prompts
from circuitscan.pipelines.caching import cache_batch
from circuitscan.pipelines.tasks.ioi import generate_ioi
from circuitscan.schemas.hooks import FINAL_LN_SCALE_HOOK, HookSite, block_hook
from circuitscan.schemas.metrics import MetricSpec
from circuitscan.schemas.neuronpedia import ACTIVATION_SCHEMA, FEATURE_SCHEMA, SOURCE_SCHEMA
from circuitscan.services.feature_directions_run import store_directions
from circuitscan.services.neuronpedia_export import export_neuronpedia
from circuitscan.services.store import FeatureStore
from circuitscan.services.store.feature_page import feature_page
from circuitscan.services.store.summaries import histogram_bin
from circuitscan.testing import build_tiny_language_model
from circuitscan.testing.tiny_models import build_tiny_model, build_tiny_sae
from circuitscan.testing.tiny_store import write_tiny_store

EPS = 1e-3


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(n_layers=2, d_model=16, n_heads=4, d_vocab=40, seed=3)


def _frozen(name: str, cache: dict[str, torch.Tensor]):
    return (name, lambda value, hook: cache[name])


@torch.no_grad()
def test_logit_effects_are_the_logit_change_of_the_direction(model) -> None:
    sae = build_tiny_sae(model, HookSite(layer=1, point="resid_post"), d_sae=12, seed=1)
    found = feature_directions(model, sae, k=5)
    unit, _ = residual_directions(model, sae)
    tokens = torch.tensor([[1, 5, 7, 9, 3]])
    _, cache = model.run_with_cache(tokens, names_filter=FINAL_LN_SCALE_HOOK)
    clean = model(tokens)[0, -1]
    scale = float(cache[FINAL_LN_SCALE_HOOK][0, -1])
    for feature in (0, 7):

        def add(value, hook, feature=feature):
            value[0, -1] += EPS * unit[feature]
            return value

        hooks = [(block_hook(1, "resid_post"), add), _frozen(FINAL_LN_SCALE_HOOK, cache)]
        delta = (model.run_with_hooks(tokens, fwd_hooks=hooks)[0, -1] - clean) * scale / EPS
        assert found.top_ids[feature].tolist() == delta.topk(5).indices.tolist()
        assert found.top_values[feature] == pytest.approx(delta.topk(5).values, abs=1e-9)
        assert found.bottom_ids[feature].tolist() == (-delta).topk(5).indices.tolist()
        assert found.bottom_values[feature] == pytest.approx(-(-delta).topk(5).values, abs=1e-9)


@torch.no_grad()
def test_reading_gains_are_the_value_path_of_the_direction(model) -> None:
    sae = build_tiny_sae(model, HookSite(layer=0, point="resid_post"), d_sae=12, seed=2)
    found = feature_directions(model, sae, k=3, heads=4)
    unit, first = residual_directions(model, sae)
    assert first == 1 and (found.head_layers == 1).all()
    tokens = torch.tensor([[2, 4, 6, 8]])
    scale_hook, v_hook = block_hook(1, "ln1_scale"), "blocks.1.attn.hook_v"
    _, cache = model.run_with_cache(tokens, names_filter=[scale_hook, v_hook])
    scales = cache[scale_hook][0, :, 0]
    W_O = model.blocks[1].attn.W_O
    for feature in (3, 10):

        def add(value, hook, feature=feature):
            return value + EPS * unit[feature]

        hooks = [(block_hook(1, "resid_pre"), add), _frozen(scale_hook, cache)]
        with model.hooks(fwd_hooks=hooks):
            _, moved = model.run_with_cache(tokens, names_filter=v_hook)
        # Per unit of the direction at a source the head attends to fully (scale undone).
        dv = (moved[v_hook] - cache[v_hook])[0] * scales[:, None, None] / EPS
        gains = torch.stack([(dv[:, h] @ W_O[h]).norm(dim=-1) for h in range(4)], dim=-1)
        assert torch.allclose(gains, gains[0:1].expand_as(gains), atol=1e-9)  # every position
        order = gains[0].argsort(descending=True)
        assert found.head_indices[feature].tolist() == order.tolist()
        assert found.head_gains[feature] == pytest.approx(gains[0][order], abs=1e-9)


@pytest.fixture(scope="module")
def page_store(tmp_path_factory):
    model = build_tiny_language_model(seed=1)
    sites = [HookSite(layer=0, point="resid_post"), HookSite(layer=1, point="resid_post")]
    saes = [build_tiny_sae(model, site, d_sae=16, seed=i) for i, site in enumerate(sites)]
    url = str(tmp_path_factory.mktemp("pages") / "store")
    prompts = generate_ioi(model.tokenizer, 12, seed=4)
    write_tiny_store(url, model, saes, prompts, shard_size=3, examples_per_feature=4)
    store = FeatureStore.open(url)
    assert store_directions(store, model, saes, k=4, heads=3) == [s.label for s in sites]
    return url, model, saes


def _dense(store: FeatureStore, site: str, feature: int) -> dict[tuple[int, int], float]:
    """(prompt, position) → the feature's stored activation, from every shard."""
    out = {}
    for entry in store.committed_entries().values():
        data = store.site_shard(entry.shard_id, site)
        offsets = store.prompt_shard(entry.shard_id).prompt_offsets
        for token in range(len(data.token_offsets) - 1):
            lo, hi = data.token_offsets[token], data.token_offsets[token + 1]
            ids = data.feature_ids[lo:hi].astype(int).tolist()
            if feature in ids:
                local = int(np.searchsorted(offsets, token, side="right") - 1)
                value = float(data.activations[lo + ids.index(feature)])
                out[(entry.prompt_start + local, token - int(offsets[local]))] = value
    return out


def test_feature_page_holds_the_store_values(page_store) -> None:
    url, model, saes = page_store
    store = FeatureStore.open(url)
    site = "L1.resid_post"
    index = store.feature_index(site)
    feature = int(index.count.argmax())
    page = feature_page(store, site, feature, n_top=4, n_sampled=3, context=2)
    dense = _dense(store, site, feature)
    assert page.summary.count == len(dense)
    # The histogram counts every activation in its bin.
    bins = np.bincount(histogram_bin(np.array(list(dense.values()))), minlength=32)
    assert page.histogram.counts == bins.tolist() and page.histogram.covered == len(dense)
    # Every example's per-token values are the stored activations (0 where it does not fire).
    for example in page.top + page.sampled:
        start = example.position - example.hit_index
        expected = [dense.get((example.prompt, start + i), 0.0) for i in range(len(example.values))]
        assert example.values == pytest.approx(expected)
        assert example.values[example.hit_index] == pytest.approx(example.activation)
    top_values = sorted(dense.values(), reverse=True)[:4]
    assert [e.activation for e in page.top] == pytest.approx(top_values)
    assert page.sampled and all(e.activation < min(top_values) for e in page.sampled)
    # Logit effects and heads are the stored directions of this site's SAE.
    found = feature_directions(model, saes[1], k=4, heads=3)
    assert [e.token_id for e in page.promoted] == found.top_ids[feature].tolist()
    assert [e.logit for e in page.suppressed] == pytest.approx(
        found.bottom_values[feature].tolist()
    )
    assert page.reading_heads == []  # nothing reads after the last layer
    assert page.pushes is not None and page.notes == []


def test_decoded_chunks_change_no_answer_and_follow_a_recomputed_shard(page_store, tmp_path):
    url, model, saes = page_store
    copy = tmp_path / "store"
    shutil.copytree(url, copy)
    site = "L1.resid_post"
    fresh = FeatureStore.open(url)
    uncached = FeatureStore.open(url)
    uncached.chunk_cache_bytes = 0
    features = np.flatnonzero(fresh.feature_index(site).count)[:6].tolist()
    reader = FeatureStore.open(str(copy))
    for feature in features * 2:  # the second round reads decoded chunks
        page = feature_page(reader, site, int(feature), n_top=4, n_sampled=3, context=2)
        assert page == feature_page(uncached, site, int(feature), n_top=4, n_sampled=3, context=2)
        assert page == feature_page(fresh, site, int(feature), n_top=4, n_sampled=3, context=2)
    # Another writer recomputes shard 1 with other prompts (as a repair might): once
    # the reader sees the new entry, it reads the new bytes, never its decoded old chunks.
    array = f"sites/{site}/activations"
    n_old = reader.committed_entries()[1].n_entries[site]
    before = reader.read_rows(1, array, 0, n_old).copy()
    writer = FeatureStore.open(str(copy))
    writer.uncommit(1)
    records = generate_ioi(model.tokenizer, 3, seed=99)
    batch = tokenize_prompts(model, records)
    caches = cache_batch(
        model,
        saes,
        batch.tokens,
        batch.lengths,
        MetricSpec(),
        answer=batch.answer,
        wrong=batch.wrong,
    )
    writer.commit_shard(writer.write_shard(1, records, batch.token_lists(), caches))
    reader.manifest.refresh()  # the manifest only: the reader's chunk cache is kept
    n_new = reader.committed_entries()[1].n_entries[site]
    after = reader.read_rows(1, array, 0, n_new)
    np.testing.assert_array_equal(after, FeatureStore.open(str(copy)).read_rows(1, array, 0, n_new))
    assert n_new != n_old or not np.array_equal(before, after)
    # The cache is bounded by bytes.
    reader.chunk_cache_bytes = 1024
    reader.read_rows(0, array, 0, reader.committed_entries()[0].n_entries[site])
    assert reader.reader._chunks.nbytes <= 1024


def test_neuronpedia_export_matches_its_schema_and_the_store(page_store, tmp_path) -> None:
    url, _, _ = page_store
    store = FeatureStore.open(url)
    folders = export_neuronpedia(url, tmp_path, model_id="tiny", examples=4, sampled=2)
    assert [f.relative_to(tmp_path).as_posix() for f in folders] == [
        "tiny/0-circuitscan-resid-post",
        "tiny/1-circuitscan-resid-post",
    ]
    for folder, site in zip(folders, store.layout.sites, strict=True):
        jsonschema.validate(json.loads((folder / "source.jsonl").read_text()), SOURCE_SCHEMA)

        def records(name: str, folder=folder) -> list[dict]:
            text = gzip.decompress((folder / name / "batch-0.jsonl.gz").read_bytes()).decode()
            return [json.loads(line) for line in text.splitlines()]

        features, activations = records("features"), records("activations")
        index = store.feature_index(site.label)
        assert sorted(int(f["index"]) for f in features) == np.flatnonzero(index.count).tolist()
        for record in features:
            jsonschema.validate(record, FEATURE_SCHEMA)
            assert record["maxActApprox"] == pytest.approx(float(index.max[int(record["index"])]))
            assert sum(record["freq_hist_data_bar_heights"]) == index.count[int(record["index"])]
        for record in activations:
            jsonschema.validate(record, ACTIVATION_SCHEMA)
            assert record["values"][record["maxValueTokenIndex"]] == record["maxValue"]
            assert len(record["tokens"]) == len(record["values"])
        best = {}
        for record in activations:
            best[record["index"]] = max(best.get(record["index"], 0.0), record["maxValue"])
        for feature, value in best.items():  # each feature's top example carries its maximum
            assert value == pytest.approx(float(index.max[int(feature)]))
    with pytest.raises(jsonschema.ValidationError):  # the schema is not a rubber stamp
        jsonschema.validate({**activations[0], "maxValueTokenIndex": -1}, ACTIVATION_SCHEMA)


def test_export_refuses_an_unknown_format(page_store, tmp_path) -> None:
    from circuitscan.services.cli import app

    url, _, _ = page_store
    done = CliRunner().invoke(app, ["export", url, "--format", "csv", "--out", str(tmp_path)])
    assert done.exit_code == 2 and "unknown export format 'csv'" in done.output


def test_neuronpedia_export_carries_a_stored_dfa(tmp_path) -> None:
    """A cache store with a DFA analysis in it: the DFA prompt is one more activation record."""
    from circuitscan.services.analysis_commands import ioi_setup, run_dfa
    from circuitscan.services.store.analyses import write_analysis

    model = build_tiny_language_model(seed=1)
    sites = [HookSite(layer=0, point="resid_post"), HookSite(layer=1, point="z")]
    saes = {s.label: build_tiny_sae(model, s, d_sae=16, seed=i) for i, s in enumerate(sites)}
    url = str(tmp_path / "store")
    write_tiny_store(url, model, list(saes.values()), generate_ioi(model.tokenizer, 6, seed=4))
    out = run_dfa(ioi_setup(3, seed=1, model=model, model_name="tiny", saes=saes))
    result = out.result
    write_analysis(FeatureStore.open(url), out)
    export = tmp_path / "export"
    folders = export_neuronpedia(url, export, model_id="tiny", examples=2, sampled=1)
    folder = next(f for f in folders if f.name == "1-circuitscan-z")
    text = gzip.decompress((folder / "activations" / "batch-0.jsonl.gz").read_bytes()).decode()
    records = [json.loads(line) for line in text.splitlines()]
    (dfa,) = [r for r in records if r["dataSource"] == "circuitscan-dfa"]
    jsonschema.validate(dfa, ACTIVATION_SCHEMA)
    assert dfa["index"] == str(result.feature) and dfa["layer"] == "1-circuitscan-z"
    assert dfa["dataIndex"] == f"analysis:{out.prompt_index}"
    assert dfa["tokens"] == result.tokens
    assert len(dfa["values"]) == len(dfa["dfaValues"]) == len(result.tokens)
    # The DFA values: per source token, the contributions of every head; with the constant
    # part they add up to the feature's pre-activation at the target token.
    contributions = np.asarray(result.contributions)
    assert dfa["dfaValues"] == pytest.approx(contributions.sum(axis=0).tolist(), abs=1e-12)
    assert sum(dfa["dfaValues"]) + result.bias == pytest.approx(result.pre_activation, abs=1e-5)
    assert dfa["dfaTargetIndex"] == result.dest_pos
    assert dfa["dfaMaxValue"] == max(dfa["dfaValues"], key=abs)
    assert dfa["values"][result.dest_pos] == pytest.approx(result.activation)
    assert dfa["maxValue"] == max(dfa["values"])
    # The feature it belongs to is exported too (an activation names a feature record).
    features = gzip.decompress((folder / "features" / "batch-0.jsonl.gz").read_bytes()).decode()
    assert str(result.feature) in [json.loads(line)["index"] for line in features.splitlines()]
    # Even when the export is cut to the busiest feature.
    (cut,) = [
        f
        for f in export_neuronpedia(url, tmp_path / "cut", max_features=1)
        if f.name == folder.name
    ]
    features = gzip.decompress((cut / "features" / "batch-0.jsonl.gz").read_bytes()).decode()
    assert str(result.feature) in [json.loads(line)["index"] for line in features.splitlines()]
    # The other site's records carry no DFA (the analysis is of the z SAE).
    other = next(f for f in folders if f.name == "0-circuitscan-resid-post")
    text = gzip.decompress((other / "activations" / "batch-0.jsonl.gz").read_bytes()).decode()
    assert all(json.loads(line)["dfaValues"] == [] for line in text.splitlines())


def test_report_and_export_refuse_an_output_folder_they_cannot_make(page_store, tmp_path) -> None:
    """A user's mistake in --out is a message and status 2, and their file is left alone."""
    from circuitscan.services.cli import app

    url, _, _ = page_store
    (tmp_path / "notes.txt").write_text("mine")
    under = str(tmp_path / "notes.txt" / "report")
    done = CliRunner().invoke(app, ["report", url, "--out", under])
    assert done.exit_code == 2, done.output
    assert f"cannot write the report to {under}: Not a directory" in done.output
    done = CliRunner().invoke(app, ["export", url, "--out", str(tmp_path / "notes.txt")])
    assert done.exit_code == 2 and "it is a file, not a folder" in done.output
    assert (tmp_path / "notes.txt").read_text() == "mine"
