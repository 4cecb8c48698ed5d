"""A writer process killed (SIGKILL) between writing a shard and committing it.

The writer is a real process writing a real Zarr store on disk; this file is
also its entry point (``python test_store_crash.py URL DATA [CRASH_SHARD]``):
it creates/reopens the store, writes and commits every uncommitted shard,
and, when told to, stops after writing one shard's data and before committing
it, so that the test can kill it exactly there.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WRITTEN = "WRITTEN"


def _writer_main(url: str, data_path: str, crash_shard: int | None) -> None:
    import torch

    from circuitscan.schemas.prompts import PromptRecord
    from circuitscan.schemas.store import StoreLayout
    from circuitscan.services.store import FeatureStore

    data = torch.load(data_path, weights_only=False)
    layout = StoreLayout.model_validate_json(data["layout"])
    store = FeatureStore.create(url, layout)
    todo = store.uncommitted(sorted(data["shards"]))
    print("TODO", *todo, flush=True)
    for shard_id in todo:
        records, token_ids, caches = data["shards"][shard_id]
        prompts = [PromptRecord.model_validate_json(r) for r in records]
        entry = FeatureStore.open(url).write_shard(shard_id, prompts, token_ids, caches)
        if shard_id == crash_shard:
            print(WRITTEN, shard_id, flush=True)
            time.sleep(600)  # killed here: data written, manifest entry not
        store.commit_shard(entry)
    store.flush_index()
    print("DONE", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _writer_main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None)
    sys.exit(0)


import pytest  # noqa: E402

pytestmark = pytest.mark.integration

N_SHARDS = 3


def _job_data(tmp_path: Path):
    """Layout and deterministic shards of a small job (the contract suite's tiny model)."""
    import torch
    from test_store_contract import make_layout, make_shard

    layout = make_layout()
    shards = {}
    for shard_id in range(N_SHARDS):
        prompts, token_ids, caches = make_shard(shard_id)
        shards[shard_id] = ([p.model_dump_json() for p in prompts], token_ids, caches)
    path = tmp_path / "job.pt"
    torch.save({"layout": layout.model_dump_json(), "shards": shards}, path)
    return layout, shards, path


def _writer(url: str, data: Path, crash_shard: int | None = None) -> subprocess.Popen[str]:
    args = [sys.executable, __file__, url, str(data)]
    if crash_shard is not None:
        args.append(str(crash_shard))
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def _digests(store) -> dict[int, str]:
    return {shard_id: entry.digest() for shard_id, entry in store.committed_entries().items()}


def test_writer_killed_between_data_and_commit_then_resumed(tmp_path):
    from test_store_contract import _fill

    from circuitscan.services.store import FeatureStore, QueryRangeError, features_at
    from circuitscan.services.store.backends import list_keys
    from circuitscan.services.store.shard_io import shard_prefix

    layout, shards, data = _job_data(tmp_path)
    url = str(tmp_path / "store")
    writer = _writer(url, data, crash_shard=1)
    assert writer.stdout is not None
    lines = []
    for line in writer.stdout:
        lines.append(line.strip())
        if line.startswith(WRITTEN):
            break
    assert lines[-1] == f"{WRITTEN} 1", lines
    os.kill(writer.pid, signal.SIGKILL)
    assert writer.wait(timeout=30) == -signal.SIGKILL

    # The killed writer's shard 1 data is on disk, but nothing shows it.
    store = FeatureStore.open(url)
    assert list_keys(store.backend, shard_prefix(1))
    assert store.committed_shard_ids() == {0}
    assert store.n_prompts() == len(shards[0][0])
    with pytest.raises(QueryRangeError, match="out of range"):
        features_at(store, layout.sites[0].label, len(shards[0][0]), 0)
    assert store.uncommitted(range(N_SHARDS)) == [1, 2]

    # Resume in a fresh process recomputes exactly the uncommitted shards.
    resumed = _writer(url, data)
    out, _ = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, out
    assert "TODO 1 2" in out and "DONE" in out

    reference = _fill(str(tmp_path / "reference"), _decoded(shards))
    final = FeatureStore.open(url)
    assert final.uncommitted(range(N_SHARDS)) == []
    assert _digests(final) == _digests(reference)
    site = layout.sites[0].label
    for feature in range(0, layout.sites[0].d_sae, 7):
        assert _summary(final, site, feature) == _summary(reference, site, feature)


def _decoded(shards):
    from circuitscan.schemas.prompts import PromptRecord

    return {
        shard_id: ([PromptRecord.model_validate_json(r) for r in records], token_ids, caches)
        for shard_id, (records, token_ids, caches) in shards.items()
    }


def _summary(store, site, feature):
    from circuitscan.services.store import feature_summary, top_examples

    return feature_summary(store, site, feature), top_examples(store, site, feature)
