"""The store on the real default model and SAEs: what it holds is what sae_lens and autograd say."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from circuitscan.pipelines.batching import tokenize_prompts
from circuitscan.pipelines.caching import cache_batch
from circuitscan.pipelines.metrics import metric_per_prompt
from circuitscan.pipelines.tasks.ioi import generate_ioi
from circuitscan.schemas.hooks import HookSite
from circuitscan.schemas.metrics import MetricSpec
from circuitscan.services.sae_loading import load_default_saes
from circuitscan.services.store import (
    FeatureStore,
    SiteLayout,
    StoreLayout,
    dense_slice,
    features_at,
)

pytestmark = [pytest.mark.slow, pytest.mark.integration]

N_PROMPTS = 6


def _reference_gradients(model, saes, batch, metric):
    """∂m/∂a = d_i · ∂m/∂x with ∂m/∂x from the model with no SAE spliced (plain autograd)."""
    deltas = {}

    def add_delta(tensor, hook):
        delta = torch.zeros_like(tensor, requires_grad=True)
        deltas[hook.name] = delta
        return tensor + delta

    names = [sae.cfg.metadata.hook_name for sae in saes]
    logits = model.run_with_hooks(batch.tokens, fwd_hooks=[(name, add_delta) for name in names])
    total = metric_per_prompt(
        logits, metric, lengths=batch.lengths, answer=batch.answer, wrong=batch.wrong
    ).sum()
    grads = torch.autograd.grad(total, [deltas[name] for name in names])
    with torch.no_grad():
        return [grad.flatten(2) @ sae.W_dec.T for sae, grad in zip(saes, grads, strict=True)]


def test_stored_values_equal_sae_lens_encoding_and_autograd(default_model, tmp_path):
    model = default_model.model
    saes = [loaded.sae for loaded in load_default_saes(model)]
    records = generate_ioi(model.tokenizer, N_PROMPTS, seed=7)
    batch = tokenize_prompts(model, records)
    metric = MetricSpec()
    caches = cache_batch(
        model, saes, batch.tokens, batch.lengths, metric, answer=batch.answer, wrong=batch.wrong
    )
    sites = [HookSite.from_hook_name(sae.cfg.metadata.hook_name) for sae in saes]
    layout = StoreLayout(
        sites=[
            SiteLayout(label=s.label, hook_name=s.hook_name, d_sae=int(sae.cfg.d_sae))
            for s, sae in zip(sites, saes, strict=True)
        ],
        shard_size=N_PROMPTS,
        model_fingerprint=default_model.fingerprint,
    )
    url = str(tmp_path / "store")
    store = FeatureStore.create(url, layout)
    store.commit_shard(store.write_shard(0, records, batch.token_lists(), caches))
    reader = FeatureStore.open(url)

    with torch.no_grad():
        _, expected = model.run_with_cache_with_saes(batch.tokens, saes=saes, use_error_term=True)
    ref_grads = _reference_gradients(model, saes, batch, metric)
    for site, ref_grad in zip(sites, ref_grads, strict=True):
        acts = expected[f"{site.hook_name}.hook_sae_acts_post"]
        for prompt, length in enumerate(batch.lengths.tolist()):
            want = acts[prompt, :length].float()
            got = dense_slice(reader, site.label, prompt)
            # float16 storage: ~3 significant digits.
            torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-3 * float(want.abs().max()))
            assert int((got != 0).sum()) == int((want != 0).sum())
            got_grad = dense_slice(reader, site.label, prompt, gradients=True)
            want_grad = ref_grad[prompt, :length].float() * (want != 0)
            scale = float(want_grad.abs().max())
            assert scale > 0
            torch.testing.assert_close(got_grad, want_grad, rtol=2e-3, atol=1e-3 * scale)
        # The answer position: features_at's attributions are a·g of the stored values.
        last = int(batch.lengths[0]) - 1
        hit = features_at(reader, site.label, 0, last)
        assert hit.token_id == int(batch.tokens[0, last])
        assert len(hit.feature_ids) == int((acts[0, last] != 0).sum())
        np.testing.assert_allclose(
            hit.attributions, np.array(hit.activations) * np.array(hit.gradients), rtol=1e-6
        )
