"""Read routes over the stores under the store root.

No ``from __future__ import annotations`` here: FastAPI reads the route
signatures at runtime, and their page-size bounds are local to the factory.

The routes are ``async``: a query on an open store takes about a millisecond,
less than handing it to a worker thread, and running every store query on
the event loop's one thread keeps the (not thread-safe) open stores safe.
The one slow first-time step, loading a tokenizer, runs in a thread.
"""

from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Depends, Path, Query, Request

from circuitscan.schemas.errors import StoreCorruptionError
from circuitscan.schemas.rankings import AttributionRanking
from circuitscan.schemas.store import FeatureSummary
from circuitscan.services.api.auth import require_reader
from circuitscan.services.api.errors import ERROR_RESPONSES, ApiError, public_message
from circuitscan.services.api.models import (
    DamagedStore,
    FeatureExamples,
    FeaturesAt,
    Page,
    PromptDetail,
    PromptFeatures,
    PromptSummary,
    StoreInfo,
    StorePage,
    StoreSummary,
    SummaryOrder,
)
from circuitscan.services.api.settings import ApiSettings
from circuitscan.services.api.store_access import (
    STORE_NAME_PATTERN,
    Decode,
    OpenStore,
    StoreRegistry,
)
from circuitscan.services.store import (
    FeatureStore,
    feature_summary,
    features_at,
    top_examples,
)

StoreName = Annotated[
    str, Path(description="Store name.", max_length=100, pattern=STORE_NAME_PATTERN)
]
SiteLabel = Annotated[str, Path(description="Site label, e.g. L6.z.", max_length=200)]
PromptIndex = Annotated[int, Path(description="Global prompt index.", ge=0)]
FeatureId = Annotated[int, Path(description="Feature id.", ge=0)]
Offset = Annotated[int, Query(description="Index of the first item to return.", ge=0)]


def _registry(request: Request) -> StoreRegistry:
    return request.app.state.stores


def _check_site(store: FeatureStore, site: str) -> None:
    labels = [s.label for s in store.layout.sites]
    if site not in labels:
        raise ApiError(404, f"unknown site {site!r}; the store has {labels}")


def _job_field(store: FeatureStore, *path: str) -> str | None:
    value: object = store.layout.job_spec
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value if isinstance(value, str) else None


def _summary(name: str, store: FeatureStore) -> StoreSummary:
    return StoreSummary(
        name=name,
        sites=[s.label for s in store.layout.sites],
        job_name=_job_field(store, "name"),
        job_kind=_job_field(store, "job", "kind"),
        shards_committed=len(store.committed_shard_ids()),
        n_prompts=store.n_prompts(),
        n_tokens=store.n_tokens(),
        damaged_shards=sorted(store.manifest.damaged()),
    )


def stores_router(settings: ApiSettings) -> APIRouter:
    """The /api/stores routes; page sizes are bounded by ``settings.max_page_size``."""
    router = APIRouter(
        prefix="/api/stores",
        tags=["stores"],
        dependencies=[Depends(require_reader)],
        responses=ERROR_RESPONSES,
    )
    max_page = settings.max_page_size
    Limit = Annotated[int, Query(description=f"Page size (1..{max_page}).", ge=1, le=max_page)]
    default_limit = min(50, max_page)

    @router.get("", response_model=StorePage, summary="List stores")
    async def list_stores(
        request: Request, offset: Offset = 0, limit: Limit = default_limit
    ) -> StorePage:
        registry = _registry(request)
        names = registry.names()
        items = []
        damaged = []
        for name in names[offset : offset + limit]:
            try:
                with registry.reading(name) as entry:
                    items.append(_summary(name, entry.store))
            except ApiError:
                continue  # removed or replaced between listing and opening
            except StoreCorruptionError as exc:  # one damaged store never hides the others
                reason = public_message(str(exc), request)
                damaged.append(DamagedStore(name=name, reason=reason))
        return StorePage(items=items, damaged=damaged, offset=offset, limit=limit, total=len(names))

    @router.get("/{store}", response_model=StoreInfo, summary="Store metadata")
    async def store_info(request: Request, store: StoreName) -> StoreInfo:
        registry = _registry(request)
        decode = await registry.decoder(store)
        with registry.reading(store) as entry:
            data = entry.store
            data.manifest.raise_if_damaged()  # its shard list would be silently short
            return StoreInfo(
                name=store,
                layout=data.layout,
                shard_ids=sorted(data.committed_shard_ids()),
                n_prompts=data.n_prompts(),
                n_tokens=data.n_tokens(),
                tokens_decoded=decode is not None,
            )

    @router.get("/{store}/prompts", response_model=Page[PromptSummary], summary="List prompts")
    async def list_prompts(
        request: Request, store: StoreName, offset: Offset = 0, limit: Limit = default_limit
    ) -> Page[PromptSummary]:
        with _registry(request).reading(store) as entry:
            data = entry.store
            total = data.n_prompts()
            items: list[PromptSummary] = []
            entries = data.committed_entries()
            stop = min(offset + limit, total)
            for shard_id in sorted(entries):
                shard = entries[shard_id]
                lo = max(offset, shard.prompt_start)
                hi = min(stop, shard.prompt_start + shard.n_prompts)
                if lo >= hi:
                    continue
                records = data.prompt_records(shard_id)
                offsets = data.prompt_shard(shard_id).prompt_offsets
                for prompt in range(lo, hi):
                    local = prompt - shard.prompt_start
                    record = records[local]
                    items.append(
                        PromptSummary(
                            prompt=prompt,
                            text=record.text,
                            n_tokens=int(offsets[local + 1] - offsets[local]),
                            answer=record.answer,
                            wrong=record.wrong,
                        )
                    )
            return Page[PromptSummary](items=items, offset=offset, limit=limit, total=total)

    @router.get("/{store}/prompts/{prompt}", response_model=PromptDetail, summary="One prompt")
    async def prompt_detail(
        request: Request, store: StoreName, prompt: PromptIndex
    ) -> PromptDetail:
        registry = _registry(request)
        decode = await registry.decoder(store)
        with registry.reading(store) as entry:
            return _prompt_detail(entry, prompt, decode)

    @router.get(
        "/{store}/sites/{site}/prompts/{prompt}/features",
        response_model=PromptFeatures,
        summary="Features at every position of a prompt",
    )
    async def prompt_features(
        request: Request,
        store: StoreName,
        site: SiteLabel,
        prompt: PromptIndex,
        limit: Annotated[
            int, Query(description="Features kept per position.", ge=1, le=max_page)
        ] = min(10, max_page),
        sort_by: Literal["attribution", "activation"] = "attribution",
    ) -> PromptFeatures:
        registry = _registry(request)
        decode = await registry.decoder(store)
        with registry.reading(store) as entry:
            _check_site(entry.store, site)
            detail = _prompt_detail(entry, prompt, decode)
            _decode_shard_of(entry.store, site, prompt)
            positions = [
                features_at(entry.store, site, prompt, position, sort_by=sort_by, limit=limit)
                for position in range(len(detail.token_ids))
            ]
            return PromptFeatures(
                site=site,
                prompt=prompt,
                text=detail.record.text,
                tokens=detail.tokens,
                positions=positions,
            )

    @router.get(
        "/{store}/sites/{site}/prompts/{prompt}/positions/{position}/features",
        response_model=FeaturesAt,
        summary="Features at one (prompt, position)",
    )
    async def features_at_position(
        request: Request,
        store: StoreName,
        site: SiteLabel,
        prompt: PromptIndex,
        position: Annotated[int, Path(description="Token position (BOS is 0).", ge=0)],
        limit: Annotated[
            int, Query(description="Most features to return.", ge=1, le=max_page)
        ] = default_limit,
        sort_by: Literal["attribution", "activation"] = "attribution",
    ) -> FeaturesAt:
        registry = _registry(request)
        decode = await registry.decoder(store)
        with registry.reading(store) as entry:
            _check_site(entry.store, site)
            _decode_shard_of(entry.store, site, prompt)
            active = features_at(entry.store, site, prompt, position, sort_by=sort_by, limit=limit)
            token = decode([active.token_id])[0] if decode is not None else None
            return FeaturesAt(token=token, features=active)

    @router.get(
        "/{store}/sites/{site}/features/{feature}/examples",
        response_model=FeatureExamples,
        summary="Top-activating examples of a feature",
    )
    async def feature_examples(
        request: Request,
        store: StoreName,
        site: SiteLabel,
        feature: FeatureId,
        limit: Annotated[int, Query(description="Most examples.", ge=1, le=max_page)] = min(
            20, max_page
        ),
        context: Annotated[int, Query(description="Tokens of context each side.", ge=0, le=64)] = 8,
    ) -> FeatureExamples:
        registry = _registry(request)
        decode = await registry.decoder(store)
        with registry.reading(store) as entry:
            _check_site(entry.store, site)
            examples = top_examples(
                entry.store,
                site,
                feature,
                n=limit,
                context=context,
                decode=decode,
            )
            return FeatureExamples(site=site, feature=feature, examples=examples)

    @router.get(
        "/{store}/sites/{site}/features/{feature}/summary",
        response_model=FeatureSummary,
        summary="Firing statistics of one feature",
    )
    async def one_feature_summary(
        request: Request, store: StoreName, site: SiteLabel, feature: FeatureId
    ) -> FeatureSummary:
        with _registry(request).reading(store) as entry:
            _check_site(entry.store, site)
            return feature_summary(entry.store, site, feature)

    @router.get(
        "/{store}/sites/{site}/summaries",
        response_model=Page[FeatureSummary],
        summary="Per-feature summaries, paginated",
    )
    async def feature_summaries(
        request: Request,
        store: StoreName,
        site: SiteLabel,
        offset: Offset = 0,
        limit: Limit = default_limit,
        order: Annotated[
            SummaryOrder, Query(description="Sort key; all but 'feature' sort descending.")
        ] = "feature",
        active_only: Annotated[
            bool, Query(description="List only features that fire at least once.")
        ] = False,
    ) -> Page[FeatureSummary]:
        with _registry(request).reading(store) as entry:
            data = entry.store
            _check_site(data, site)
            index = data.feature_index(site)
            features = np.arange(index.count.shape[0])
            if active_only:
                features = features[index.count > 0]
            if order != "feature":
                key = {"count": index.count, "max": index.max, "total": index.total}[order]
                # Stable sort, descending by key, ties by ascending feature id.
                features = features[np.argsort(-key[features].astype(np.float64), kind="stable")]
            chosen = features[offset : offset + limit]
            items = [feature_summary(data, site, int(f)) for f in chosen]
            return Page[FeatureSummary](
                items=items, offset=offset, limit=limit, total=int(features.shape[0])
            )

    @router.get(
        "/{store}/sites/{site}/top-attributions",
        response_model=AttributionRanking,
        summary="Corpus-wide rankings by attribution a·∂m/∂a (from the index)",
    )
    async def top_attributions_route(
        request: Request,
        store: StoreName,
        site: SiteLabel,
        per: Annotated[
            Literal["feature", "prompt", "position"] | None,
            Query(
                description="feature: features over the store (default without a feature); "
                "prompt: the feature's prompts (default with one); position: its entries."
            ),
        ] = None,
        feature: Annotated[int | None, Query(description="Feature id.", ge=0)] = None,
        limit: Annotated[int, Query(description="Rows at most.", ge=1, le=max_page)] = min(
            20, max_page
        ),
        rank_by: Annotated[
            Literal["sum", "abs", "atp", "atp_abs"],
            Query(
                description="Per feature: sum ranks by |Σ a·g|, abs by Σ |a·g|; in a paired "
                "cache atp by |Σ (a' − a)·g|, atp_abs by Σ |(a' − a)·g|."
            ),
        ] = "sum",
    ) -> AttributionRanking:
        from circuitscan.services.store.rankings import top_attributions

        chosen = per or ("feature" if feature is None else "prompt")
        if chosen == "feature" and feature is not None:
            raise ApiError(400, "per=feature ranks every feature: leave out feature")
        if chosen != "feature" and feature is None:
            raise ApiError(400, f"per={chosen} ranks one feature's {chosen}s: give feature")
        with _registry(request).reading(store) as entry:
            _check_site(entry.store, site)
            return top_attributions(
                entry.store, site, per=chosen, feature=feature, n=limit, rank_by=rank_by
            )

    return router


def _decode_shard_of(store: FeatureStore, site: str, prompt: int) -> None:
    """Decode the prompt's whole site shard into the store's cache (once per shard).

    A point query on an uncached shard reads a few chunks from disk every
    time; this long-lived process instead decodes each shard once and then
    answers from memory.
    """
    shard = store.shard_of_prompt(prompt)  # QueryRangeError (404) names the bound
    store.site_shard(shard.shard_id, site)


def _prompt_detail(entry: OpenStore, prompt: int, decode: Decode | None) -> PromptDetail:
    data = entry.store
    shard = data.shard_of_prompt(prompt)  # QueryRangeError (404) names the bound
    record = data.prompt_records(shard.shard_id)[prompt - shard.prompt_start]
    token_ids = [int(t) for t in data.prompt_tokens(prompt)]
    return PromptDetail(
        prompt=prompt,
        record=record,
        token_ids=token_ids,
        tokens=decode(token_ids) if decode is not None else None,
    )
