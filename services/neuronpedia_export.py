"""``circuitscan export STORE --format neuronpedia --out DIR``: feature records Neuronpedia imports.

For each SAE site of a cache store, the folder ``DIR/<model id>/<layer>-<set>/``
(Neuronpedia's source id: the layer number and a source-set name, e.g.
``15-circuitscan-resid-post``) gets

- ``source.jsonl``: the source (model id, set name, hook);
- ``features/batch-0.jsonl.gz``: one Feature per active feature (id
  ``model/layer-set/index``): max activation, density (``frac_nonzero``),
  the activation histogram, and the tokens its decoder direction promotes /
  suppresses (``pos_str``/``neg_str``, when the store holds its directions);
- ``activations/batch-0.jsonl.gz``: its top and sampled examples, each with
  its context tokens, the feature's value on every token, ``maxValue`` and
  ``maxValueTokenIndex``; plus, when the store keeps a DFA analysis of the
  feature, that prompt with its per-source-token DFA values.

Everything comes from the feature pages (``services/store/feature_page.py``),
so an export reads the merged index, not the whole store. The record shapes
are ``circuitscan.schemas.neuronpedia``'s schemas.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from circuitscan.schemas.feature_page import PageExample
from circuitscan.schemas.hooks import HookSite
from circuitscan.services.store import FeatureStore
from circuitscan.services.store.errors import StoreError
from circuitscan.services.store.feature_page import feature_page

Decode = Callable[[Sequence[int]], list[str]]


class ExportError(StoreError):
    """A store or option the export cannot use (no SAE site, a bad name)."""


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def source_id(site: str, source_set: str) -> str:
    """Neuronpedia's layer/source id of a site: ``<layer>-<set>-<point>``."""
    parsed = HookSite.parse(site)
    return f"{parsed.layer}-{_slug(source_set)}-{_slug(parsed.point)}"


def _activation(
    model_id: str, layer: str, feature: int, example: PageExample, extra: dict[str, Any]
) -> dict[str, Any]:
    tokens = example.tokens or [f"[{t}]" for t in example.token_ids]
    values = [float(v) for v in example.values]
    peak = int(np.argmax(values))
    key = f"{model_id}/{layer}/{feature}/{example.prompt}/{example.position}"
    return {
        "id": "cs" + hashlib.sha1(key.encode()).hexdigest()[:23],
        "modelId": model_id,
        "layer": layer,
        "index": str(feature),
        "tokens": tokens,
        "values": values,
        "maxValue": values[peak],
        "maxValueTokenIndex": peak,
        "minValue": min(values),
        "creatorId": None,
        "dataSource": "circuitscan",
        "dataIndex": f"{example.prompt}:{example.position}",
        "dfaValues": [],
        "dfaTargetIndex": None,
        "dfaMaxValue": None,
    } | extra


def _dfa_activations(
    store: FeatureStore, model_id: str, layer: str, site: str
) -> dict[int, dict[str, Any]]:
    """The store's DFA analysis (``analyze dfa --store``) as one activation record, by feature."""
    from circuitscan.services.store.analyses import read_analysis

    try:
        output = read_analysis(store, "dfa")
    except StoreError:
        return {}
    result = getattr(output, "result", None)
    if result is None or result.site != site or not result.tokens:
        return {}
    per_source = np.asarray(result.contributions, dtype=np.float64).sum(axis=0).tolist()
    n = len(result.tokens)
    values = [0.0] * n
    values[result.dest_pos] = float(result.activation)
    dfa = [float(v) for v in per_source[:n]] + [0.0] * max(0, n - len(per_source))
    record = {
        "id": "cs" + hashlib.sha1(f"{model_id}/{layer}/dfa".encode()).hexdigest()[:23],
        "modelId": model_id,
        "layer": layer,
        "index": str(result.feature),
        "tokens": list(result.tokens),
        "values": values,
        "maxValue": max(values),
        "maxValueTokenIndex": int(np.argmax(values)),
        "minValue": min(values),
        "creatorId": None,
        "dataSource": "circuitscan-dfa",
        "dataIndex": f"analysis:{output.prompt_index}",
        "dfaValues": dfa,
        "dfaTargetIndex": int(result.dest_pos),
        "dfaMaxValue": max(dfa, key=abs) if dfa else None,
    }
    return {int(result.feature): record}


def _write_jsonl_gz(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in records)
    path.write_bytes(gzip.compress(text.encode(), compresslevel=5, mtime=0))


def export_neuronpedia(
    store_url: str,
    out: Path,
    *,
    model_id: str | None = None,
    source_set: str = "circuitscan",
    decode: Decode | None = None,
    max_features: int | None = None,
    examples: int = 10,
    sampled: int = 6,
    context: int = 12,
) -> list[Path]:
    """Write the export folders of every site of the store; returns the source folders."""
    store = FeatureStore.open(store_url)
    if not store.layout.sites:
        raise ExportError(f"{store_url} caches no SAE site: nothing to export to Neuronpedia")
    spec = store.layout.job_spec or {}
    source = str((spec.get("model") or {}).get("source", "model"))
    model = _slug(model_id or Path(source).name)
    folders = []
    for site in store.layout.sites:
        layer = source_id(site.label, source_set)
        folder = out / model / layer
        index = store.feature_index(site.label)
        order = np.flatnonzero(index.count > 0)
        order = order[np.argsort(-index.count[order], kind="stable")][:max_features]
        dfa = _dfa_activations(store, model, layer, site.label)
        # A DFA record names its feature, so that feature is exported even when it is
        # not among the busiest (or never fired in this store's prompts).
        wanted = {int(f) for f in order} | {f for f in dfa if 0 <= f < site.d_sae}
        features, activations = [], []
        for feature in sorted(wanted):
            page = feature_page(
                store,
                site.label,
                feature,
                n_top=examples,
                n_sampled=sampled,
                context=context,
                decode=decode,
            )
            edges = np.asarray(page.histogram.edges)
            features.append(
                {
                    "modelId": model,
                    "layer": layer,
                    "index": str(feature),
                    "creatorId": None,
                    "maxActApprox": float(page.summary.max),
                    "hasVector": False,
                    "vector": [],
                    "hookName": site.hook_name,
                    "frac_nonzero": min(1.0, float(page.density)),
                    "pos_str": [e.token or f"[{e.token_id}]" for e in page.promoted or []],
                    "pos_values": [float(e.logit) for e in page.promoted or []],
                    "neg_str": [e.token or f"[{e.token_id}]" for e in page.suppressed or []],
                    "neg_values": [float(e.logit) for e in page.suppressed or []],
                    "freq_hist_data_bar_heights": [float(c) for c in page.histogram.counts],
                    "freq_hist_data_bar_values": np.sqrt(edges[:-1] * edges[1:]).tolist(),
                }
            )
            activations += [
                _activation(model, layer, feature, ex, {}) for ex in [*page.top, *page.sampled]
            ]
            if feature in dfa:
                activations.append(dfa[feature])
        folder.mkdir(parents=True, exist_ok=True)
        source_record = {
            "id": layer,
            "modelId": model,
            "setName": _slug(f"{source_set}-{HookSite.parse(site.label).point}"),
            "visibility": "PUBLIC",
            "hookName": site.hook_name,
        }
        (folder / "source.jsonl").write_text(json.dumps(source_record) + "\n")
        _write_jsonl_gz(folder / "features" / "batch-0.jsonl.gz", features)
        _write_jsonl_gz(folder / "activations" / "batch-0.jsonl.gz", activations)
        folders.append(folder)
    return folders
