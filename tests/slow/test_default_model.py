"""The real default model (SmolLM2-135M-Instruct) loaded through circuitscan."""

from __future__ import annotations

import pytest
import torch

from circuitscan.pipelines.batching import tokenize_prompts
from circuitscan.pipelines.metrics import metric_per_prompt
from circuitscan.pipelines.sae_splice import spliced
from circuitscan.pipelines.tasks.ioi import generate_ioi
from circuitscan.schemas.metrics import MetricSpec
from circuitscan.services.sae_loading import default_sae_names, load_default_saes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ioi_batch(default_model):
    records = generate_ioi(default_model.model.tokenizer, 32, seed=123)
    return tokenize_prompts(default_model.model, records)


def _logit_diff(logits: torch.Tensor, batch) -> torch.Tensor:
    return metric_per_prompt(
        logits, MetricSpec(), lengths=batch.lengths, answer=batch.answer, wrong=batch.wrong
    )


def test_default_model_shape_and_fingerprint(default_model) -> None:
    cfg = default_model.model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_key_value_heads) == (30, 576, 9, 3)
    assert len(default_model.fingerprint) == 32
    assert default_model.source_dir is not None and default_model.source_dir.is_dir()


@torch.no_grad()
def test_default_model_solves_ioi(default_model, ioi_batch) -> None:
    diff = _logit_diff(default_model.model(ioi_batch.tokens), ioi_batch)
    assert float(diff.mean()) > 2.0, f"mean IOI logit diff {float(diff.mean()):.2f}"
    assert float((diff > 0).float().mean()) > 0.8


@torch.no_grad()
def test_shipped_saes_with_error_term_leave_logits_unchanged(default_model, ioi_batch) -> None:
    model = default_model.model
    loaded = load_default_saes(model)
    assert {s.name for s in loaded} == set(default_sae_names()) >= {"L15.resid_post", "L15.z"}
    plain = model(ioi_batch.tokens)
    for one in loaded:
        with spliced(model, [one.sae]):
            alone = model(ioi_batch.tokens)
        assert float((alone - plain).abs().max()) < 1e-4, one.name
    with spliced(model, [s.sae for s in loaded]):
        together = model(ioi_batch.tokens)
    assert float((together - plain).abs().max()) < 1e-4
    # Without the error term the SAEs do change the output: the splice is real.
    with spliced(model, [loaded[0].sae], use_error_term=False):
        lossy = model(ioi_batch.tokens)
    assert float((lossy - plain).abs().max()) > 1e-2


def test_first_loads_in_parallel_convert_the_gguf_once(tmp_path) -> None:
    """Two processes meeting an empty model cache at once (a fresh actor pool):
    one converts, the other waits for it, and neither sees a half-written copy."""
    import os
    import subprocess
    import sys

    code = (
        "from circuitscan.services.model_loading import _ensure_converted, default_gguf_path\n"
        "from safetensors import safe_open\n"
        "target, converted = _ensure_converted(default_gguf_path())\n"
        "with safe_open(str(target / 'model.safetensors'), 'pt') as f: assert len(list(f.keys())) > 100\n"
        "print(int(converted), target)\n"
    )
    env = {**os.environ, "CIRCUITSCAN_HOME": str(tmp_path / "home")}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=600)[0].split() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    assert sorted(int(out[0]) for out in outputs) == [0, 1]  # exactly one converted
    assert outputs[0][1] == outputs[1][1]
