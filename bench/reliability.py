"""Reliability: every kind of store object damaged four ways, and the CLI's bad inputs.

A small real store (tiny Llama-like model, one SAE site, three shards, a job
result) is written in process; each case damages one object of a copy
(circuitscan.testing.corruption: shard chunk, shard metadata, manifest entry,
index chunk, index pointer, result document, layout document, job record ×
truncate, flip, replace, delete) and asks every Python reader (summaries,
features at each prompt, top examples, prompt records, the job result) and
``verify_store``. A case is detected when a reader or verify reports it as
damage (a StoreCorruptionError naming the object; a deleted result document
counts only when it is reported as damage, not as "no such result": the job
record says the job wrote it); a silent wrong answer is a reader answering
other data than the undamaged store without an error. The cases
``circuitscan repair`` restores without the job's model (the merged index,
the layout document, the job record) are repaired and compared byte-for-byte
with the undamaged store; shards, manifest entries and results are repaired
by resuming the job on Ray, byte for byte as tests/integration/test_jobs.py
checks (``test_repair_restores_damaged_shards_entries_and_results_byte_for_byte``).
Then every case of circuitscan.testing.bad_inputs runs through the CLI in
process.

    .venv/bin/python bench/reliability.py

Ends with one JSON line: corruptions_tried, corruptions_detected,
silent_wrong_answers, repaired_identical, repairable, bad_inputs_tried,
bad_inputs_with_traceback (and corruptions_undetected, repairs_not_identical:
the differences the targets hold to 0).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

N_PROMPTS = 6
SHARD_SIZE = 2
D_SAE = 48


def build_store(url: str) -> str:
    import torch

    from circuitscan.schemas.hooks import HookSite
    from circuitscan.schemas.job_results import AttributionJobResult, NodeEffect
    from circuitscan.services.store import FeatureStore
    from circuitscan.services.store.results import write_job_result
    from circuitscan.testing import build_tiny_language_model, build_tiny_sae, write_tiny_store

    torch.manual_seed(0)
    model = build_tiny_language_model()
    site = HookSite.parse("L1.z")
    sae = build_tiny_sae(model, site, d_sae=D_SAE, seed=1, dtype=torch.float32)
    words = ["Mary", "John", "Anna", "Tom", "Lisa", "Mark"]
    prompts = [
        {"text": f"When {a} and {b} went out, {b} gave it to", "answer": f" {a}", "wrong": f" {b}"}
        for a, b in zip(words, words[1:] + words[:1], strict=True)
    ][:N_PROMPTS]
    write_tiny_store(url, model, [sae], prompts, shard_size=SHARD_SIZE)
    store = FeatureStore.open(url)
    result = AttributionJobResult(
        job_hash=store.layout.job_hash,
        method="atp",
        n_prompts=N_PROMPTS,
        n_nodes=2,
        n_verified=0,
        top=[
            NodeEffect(node=f"feature:{site.label}:{i}@last", mean=0.5, mean_abs=0.5, n_prompts=6)
            for i in range(2)
        ],
    )
    write_job_result(store, result)
    return site.label


def readers(url: str, site: str) -> dict[str, Callable[[], object]]:
    from circuitscan.services.store import FeatureStore, feature_summary, features_at, top_examples
    from circuitscan.services.store.results import read_result

    def summaries() -> object:
        store = FeatureStore.open(url)
        return [feature_summary(store, site, f).model_dump() for f in range(D_SAE)]

    def points() -> object:
        store = FeatureStore.open(url)
        return [features_at(store, site, p, 1).model_dump() for p in range(N_PROMPTS)]

    def examples() -> object:
        store = FeatureStore.open(url)
        return [[e.model_dump() for e in top_examples(store, site, f, 4)] for f in (0, 5, 17)]

    def records() -> object:
        store = FeatureStore.open(url)
        n_shards = -(-N_PROMPTS // SHARD_SIZE)
        return [[r.model_dump() for r in store.prompt_records(i)] for i in range(n_shards)]

    return {
        "summary": summaries,
        "features_at": points,
        "top_examples": examples,
        "prompts": records,
        "result": lambda: read_result(url, "attribute").model_dump(),
    }


def ask(call: Callable[[], object]) -> tuple[str, object]:
    from circuitscan.schemas.errors import NotFoundError, StoreCorruptionError

    try:
        return "value", call()
    except StoreCorruptionError as exc:
        return "damage", str(exc)
    except NotFoundError as exc:
        return "absent", str(exc)
    except Exception as exc:  # a traceback a user would see: neither right nor reported
        return f"crash:{type(exc).__name__}", str(exc)


def main() -> None:
    from circuitscan.services.jobs.repair import repair_store
    from circuitscan.services.store.integrity import verify_store
    from circuitscan.testing.bad_inputs import BAD_INPUTS, run_bad_input
    from circuitscan.testing.corruption import (
        DAMAGES,
        KINDS,
        REPAIRED_WITHOUT_MODEL,
        damage,
        object_cases,
        store_files,
    )

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="circuitscan-reliability-"))
    try:
        pristine = work / "pristine"
        site = build_store(str(pristine))
        baseline = {name: call() for name, call in readers(str(pristine), site).items()}
        cases = object_cases(pristine, site, "attribute", work)
        undamaged = store_files(pristine)
        tried = detected = silent = crashes = repaired = repairable = 0
        for kind in KINDS:
            for how in DAMAGES:
                tried += 1
                copy = work / f"{kind.replace(' ', '-')}-{how}"
                shutil.copytree(pristine, copy)
                damage(copy, cases[kind].key, how, cases[kind].other)
                outcomes = {n: ask(c) for n, c in readers(str(copy), site).items()}
                wrong = [n for n, (s, v) in outcomes.items() if s == "value" and v != baseline[n]]
                crashed = [n for n, (s, _v) in outcomes.items() if s.startswith("crash")]
                reported = [n for n, (s, _v) in outcomes.items() if s == "damage"]
                flagged = not verify_store(str(copy)).ok
                silent += len(wrong)
                crashes += len(crashed)
                detected += bool(reported or flagged)
                line = f"{kind:>16} {how:>8}: verify {'flags it' if flagged else 'passes'}, "
                line += f"readers reporting {len(reported)}, wrong {wrong}, crashed {crashed}"
                if kind in REPAIRED_WITHOUT_MODEL:
                    repairable += 1
                    report = repair_store(str(copy))
                    same = report.ok and store_files(copy) == undamaged
                    repaired += same
                    line += f", repaired {'byte-identical' if same else 'NOT identical'}"
                print(line, flush=True)
        tracebacks = 0
        for i, case in enumerate(BAD_INPUTS):
            code, traceback, output = run_bad_input(case, work / f"bad-{i}", pristine)
            tracebacks += traceback
            last = output.strip().splitlines()[-1] if output.strip() else ""
            print(
                f"bad input {case.name!r}: exit {code}{' TRACEBACK' if traceback else ''}: {last}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        json.dumps(
            {
                "corruptions_tried": tried,
                "corruptions_detected": detected,
                "silent_wrong_answers": silent,
                "reader_crashes": crashes,
                "repaired_identical": repaired,
                "repairable": repairable,
                # The two "equal" targets as figures run_all can hold to 0.
                "corruptions_undetected": tried - detected,
                "repairs_not_identical": repairable - repaired,
                "bad_inputs_tried": len(BAD_INPUTS),
                "bad_inputs_with_traceback": tracebacks,
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
