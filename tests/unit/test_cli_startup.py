"""The CLI's store commands start without torch or Ray (whole-process timings: bench/cli_startup.py).

A real store is written here (torch is fine in the writer); every store
command then runs in one fresh interpreter, which reports after each command
which heavy packages it has imported so far.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from circuitscan.pipelines.site_cache import SiteCache
from circuitscan.schemas.job_results import AttributionJobResult, NodeEffect
from circuitscan.schemas.prompts import PromptRecord
from circuitscan.schemas.store import SiteLayout, StoreLayout
from circuitscan.services.store import FeatureStore
from circuitscan.services.store.results import write_job_result
from circuitscan.services.token_decoding import fast_decoder, token_decoder

HEAVY = ("torch", "ray", "transformer_lens", "sae_lens", "transformers")
SITE = "L0.resid_post"
D_SAE = 48

# Runs each command line (a JSON list of argument lists) through the real app and
# appends {"args", "exit", "heavy"} per command to the file named by argv[2].
RUNNER = """
import json, sys
HEAVY = {heavy!r}
from circuitscan.services.cli import app
report = []
for args in json.loads(sys.argv[1]):
    code = app(args, prog_name="circuitscan", standalone_mode=False)
    heavy = sorted(m for m in HEAVY if m in sys.modules)
    report.append({{"args": args, "exit": code or 0, "heavy": heavy}})
open(sys.argv[2], "w").write(json.dumps(report))
"""


def _store(url: str, model_source: str) -> FeatureStore:
    """Two shards of sparse activations and gradients, and an attribute job result."""
    layout = StoreLayout(
        sites=[SiteLayout(label=SITE, hook_name="blocks.0.hook_resid_post", d_sae=D_SAE)],
        value_dtype="bfloat16",
        gradients=True,
        examples_per_feature=4,
        shard_size=3,
        model_fingerprint="tiny",
        job_hash="startup",
        job_spec={"name": "startup", "model": {"source": model_source}, "job": {"kind": "cache"}},
    )
    store = FeatureStore.create(url, layout)
    rng = np.random.default_rng(0)
    for shard_id in range(2):
        token_ids = [[1, *rng.integers(2, 900, 5).tolist()] for _ in range(3)]
        n_tokens, per_token = 18, 4
        features = [np.sort(rng.choice(D_SAE, per_token, replace=False)) for _ in range(n_tokens)]
        cache = SiteCache(
            token_index=torch.arange(n_tokens).repeat_interleave(per_token),
            feature_ids=torch.from_numpy(np.concatenate(features).astype(np.int64)),
            activations=torch.rand(n_tokens * per_token) + 0.1,
            gradients=torch.randn(n_tokens * per_token),
            error_norm=torch.rand(n_tokens),
            dropped_mass=torch.zeros(n_tokens),
            n_tokens=n_tokens,
            d_sae=D_SAE,
        )
        prompts = [PromptRecord(text=f"prompt {shard_id}.{i}") for i in range(3)]
        store.commit_shard(store.write_shard(shard_id, prompts, token_ids, {SITE: cache}))
    store.flush_index()
    top = [NodeEffect(node="z:L1:0@last", mean=-0.5, mean_abs=0.5, n_prompts=6)]
    write_job_result(
        store,
        AttributionJobResult(
            job_hash="startup", method="atp", n_prompts=6, n_nodes=1, n_verified=0, top=top
        ),
    )
    return store


def test_store_commands_import_neither_torch_nor_ray(tiny_hf_model_dir, tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    _store(url, str(tiny_hf_model_dir))
    feature = int(np.flatnonzero(FeatureStore.open(url).feature_index(SITE).count)[0])
    commands = [
        ["query", "--help"],
        ["results", "--help"],
        ["query", url, "features-at", "--prompt", "1", "--position", "2"],
        ["query", url, "top-examples", "--feature", str(feature), "--n", "2"],
        ["query", url, "summary"],
        ["query", url, "summary", "--feature", str(feature)],
        ["results", url],
        ["results", url, "--json"],
        ["schema"],
        ["report", url, "--out", str(tmp_path / "report")],
        ["status", "--help"],
    ]
    out = tmp_path / "modules.json"
    done = subprocess.run(
        [sys.executable, "-c", RUNNER.format(heavy=HEAVY), json.dumps(commands), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert [r["args"] for r in report] == commands
    assert all(r["exit"] == 0 for r in report), report
    assert [r for r in report if r["heavy"]] == [], report
    # The commands did their work: the point query decoded its token, the report exists.
    assert "prompt 1 position 2 token '" in done.stdout and "z:L1:0@last" in done.stdout
    assert (tmp_path / "report" / "index.html").is_file()


def test_fast_token_decoding_equals_transformers_on_every_token(tiny_hf_model_dir) -> None:
    """The tokenizers-only decoder gives exactly what the model's tokenizer gives, per id."""
    from circuitscan.schemas.models import ModelSpec
    from circuitscan.services.model_loading import load_tokenizer

    spec = ModelSpec(source=str(tiny_hf_model_dir))
    fast = fast_decoder(spec)
    assert fast is not None
    tokenizer = load_tokenizer(spec)
    ids = list(range(len(tokenizer)))
    assert fast(ids) == [tokenizer.decode([i]) for i in ids]
    assert token_decoder(spec)(ids[:50]) == fast(ids[:50])


def test_tokenizers_that_clean_up_spaces_go_through_transformers(tmp_path: Path) -> None:
    """WordPiece-style clean-up is transformers' own post-processing: no fast path for it."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    from circuitscan.schemas.models import ModelSpec

    Tokenizer(WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(
        str(tmp_path / "tokenizer.json")
    )
    spec = ModelSpec(source=str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({}))
    assert fast_decoder(spec) is not None
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"clean_up_tokenization_spaces": True})
    )
    assert fast_decoder(spec) is None


def test_bfloat16_values_decode_without_torch_exactly() -> None:
    from circuitscan.services.store.shard_io import decode_values, encode_values

    values = torch.randn(10_000) * 10.0 ** torch.randint(-30, 30, (10_000,))
    values[:4] = torch.tensor([0.0, -0.0, float("inf"), float("nan")])
    expected = values.to(torch.bfloat16).float().numpy()
    got = decode_values(encode_values(values, "bfloat16"), "bfloat16")
    assert got.dtype == np.float32
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))
