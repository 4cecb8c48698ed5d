"""Circuit-analysis outputs kept in a feature store, beside its job results.

One JSON document per analysis kind, ``analyses/<kind>.json`` (a DFA tree, QK
tables, head rankings), written in one put so that a reader sees all of it or
none; writing a kind again replaces it. A splice evaluation is not kept here:
it becomes the store's ``splice_eval`` job result (``results.write_job_result``),
which is what readers of splice jobs expect.

    write_analysis(store, output)
    read_analysis(store, "dfa") -> DFAOutput
"""

from __future__ import annotations

from pydantic import BaseModel, TypeAdapter, ValidationError

from circuitscan.schemas.analyses import AnalysisOutput
from circuitscan.services.store.backends import read_bytes, write_bytes
from circuitscan.services.store.errors import CorruptResultError, ResultNotFoundError
from circuitscan.services.store.feature_store import FeatureStore

ANALYSES_PREFIX = "analyses/"
_OUTPUT: TypeAdapter[AnalysisOutput] = TypeAdapter(AnalysisOutput)


def _key(kind: str) -> str:
    return f"{ANALYSES_PREFIX}{kind}.json"


def _open(store: FeatureStore | str) -> FeatureStore:
    return store if isinstance(store, FeatureStore) else FeatureStore.open(store)


def write_analysis(store: FeatureStore, output: BaseModel) -> None:
    """Keep one analysis output (any model with a ``kind``) under its kind."""
    kind = getattr(output, "kind", None)
    if not isinstance(kind, str):
        raise TypeError(f"{type(output).__name__} has no kind: not an analysis output")
    write_bytes(store.backend, _key(kind), output.model_dump_json().encode())


def read_analysis(store: FeatureStore | str, kind: str) -> AnalysisOutput:
    """The analysis output of ``kind``, validated."""
    opened = _open(store)
    raw = read_bytes(opened.backend, _key(kind))
    if raw is None:
        raise ResultNotFoundError(f"{opened.url} holds no {kind} analysis")
    try:
        return _OUTPUT.validate_json(raw)
    except ValidationError as exc:
        raise CorruptResultError(f"analysis {_key(kind)} of {opened.url} is unreadable") from exc
