"""The caching pipeline against sae_lens's own encoding and independent autograd."""

from __future__ import annotations

import pytest
import torch

from circuitscan.pipelines.batching import (
    TokenizationError,
    pad_right,
    single_token,
    tokenize_prompts,
)
from circuitscan.pipelines.caching import cache_batch, merge_site_caches
from circuitscan.pipelines.metrics import metric_per_prompt
from circuitscan.schemas.hooks import HookSite
from circuitscan.schemas.metrics import MetricSpec
from circuitscan.schemas.prompts import PromptRecord

SITES = [HookSite(layer=0, point="resid_post"), HookSite(layer=1, point="z")]
METRICS = [
    MetricSpec(kind="logit_diff"),
    MetricSpec(kind="target_logprob", position=2),
    MetricSpec(kind="next_token_loss"),
]


def _batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 4, 5])
    tokens = torch.randint(1, 40, (3, 7), generator=generator)
    tokens[1, 4:] = 0
    tokens[2, 5:] = 0
    answer, wrong = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    return tokens, lengths, answer, wrong


def test_activations_equal_sae_lens_encoding(tiny_model, tiny_saes):
    saes = tiny_saes(tiny_model, SITES)
    tokens, lengths, answer, wrong = _batch()
    caches = cache_batch(
        tiny_model, saes, tokens, lengths, MetricSpec(), answer=answer, wrong=wrong
    )
    no_grad = cache_batch(tiny_model, saes, tokens, lengths, None, gradients=False)
    start = 0
    for row, length in enumerate(lengths.tolist()):
        # Each prompt alone, unpadded, through sae_lens's own spliced run.
        _, cache = tiny_model.run_with_cache_with_saes(
            tokens[row : row + 1, :length], saes=saes, use_error_term=True
        )
        for site in SITES:
            expected = cache[f"{site.hook_name}.hook_sae_acts_post"][0]
            error = cache[f"{site.hook_name}.hook_sae_error"][0].flatten(1).norm(dim=-1)
            for got in (caches[site.label], no_grad[site.label]):
                dense = got.dense()[start : start + length]
                torch.testing.assert_close(dense, expected, rtol=1e-9, atol=1e-9)
                torch.testing.assert_close(got.error_norm[start : start + length], error)
        start += length
    assert caches[SITES[0].label].n_tokens == int(lengths.sum())


def _reference_gradients(model, saes, tokens, lengths, metric, answer, wrong):
    """∂m/∂a = W_dec · ∂m/∂x at each site, with ∂m/∂x from the model without any SAE."""
    deltas = {}

    def add_delta(tensor, hook):
        delta = torch.zeros_like(tensor, requires_grad=True)
        deltas[hook.name] = delta
        return tensor + delta

    logits = model.run_with_hooks(tokens, fwd_hooks=[(site.hook_name, add_delta) for site in SITES])
    total = metric_per_prompt(
        logits, metric, lengths=lengths, tokens=tokens, answer=answer, wrong=wrong
    ).sum()
    grads = torch.autograd.grad(total, [deltas[site.hook_name] for site in SITES])
    return {
        site.label: grad.flatten(2) @ sae.W_dec.T
        for site, sae, grad in zip(SITES, saes, grads, strict=True)
    }


@pytest.mark.parametrize("metric", METRICS, ids=lambda m: m.kind)
def test_gradients_equal_independent_autograd(tiny_model, tiny_saes, metric):
    saes = tiny_saes(tiny_model, SITES)
    tokens, lengths, answer, wrong = _batch()
    caches = cache_batch(tiny_model, saes, tokens, lengths, metric, answer=answer, wrong=wrong)
    reference = _reference_gradients(tiny_model, saes, tokens, lengths, metric, answer, wrong)
    real = torch.arange(tokens.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
    for site in SITES:
        got = caches[site.label]
        expected = reference[site.label][real][got.token_index, got.feature_ids]
        assert got.gradients is not None
        torch.testing.assert_close(got.gradients, expected, rtol=1e-8, atol=1e-10)
        assert got.gradients.abs().max() > 0
    # Parameters keep their requires_grad flags and the model is left without SAEs.
    assert all(p.requires_grad for p in tiny_model.parameters())
    assert not tiny_model._acts_to_saes


def test_gradient_matches_patching_a_feature(tiny_model, tiny_saes):
    """Nudging one upstream feature by ±ε (downstream SAE error recomputed) moves m by g·ε."""
    saes = tiny_saes(tiny_model, SITES)
    tokens, lengths, answer, wrong = _batch()
    metric = MetricSpec()
    caches = cache_batch(tiny_model, saes, tokens, lengths, metric, answer=answer, wrong=wrong)
    site_cache = caches[SITES[0].label]
    # The entry with the largest |gradient| (prompt 0, so token index == position).
    in_prompt0 = site_cache.token_index < int(lengths[0])
    entry = int(torch.argmax(site_cache.gradients.abs() * in_prompt0))
    position = int(site_cache.token_index[entry])
    feature = int(site_cache.feature_ids[entry])
    direction = saes[0].W_dec[feature]

    def metric_with(eps: float) -> float:
        def nudge(tensor, hook):
            tensor = tensor.clone()
            tensor[0, position] += eps * direction
            return tensor

        tiny_model.add_sae(saes[1], use_error_term=True)
        try:
            logits = tiny_model.run_with_hooks(tokens, fwd_hooks=[(SITES[0].hook_name, nudge)])
        finally:
            tiny_model.reset_saes()
        values = metric_per_prompt(logits, metric, lengths=lengths, answer=answer, wrong=wrong)
        return float(values[0].detach())

    eps = 1e-5
    finite_difference = (metric_with(eps) - metric_with(-eps)) / (2 * eps)
    assert finite_difference == pytest.approx(float(site_cache.gradients[entry]), rel=1e-5)


def test_padding_never_changes_a_prompt(tiny_model, tiny_saes):
    saes = tiny_saes(tiny_model, SITES)
    tokens, lengths, answer, wrong = _batch()
    batched = cache_batch(
        tiny_model, saes, tokens, lengths, MetricSpec(), answer=answer, wrong=wrong
    )
    singles = [
        cache_batch(
            tiny_model,
            saes,
            tokens[row : row + 1, :length],
            lengths[row : row + 1],
            MetricSpec(),
            answer=answer[row : row + 1],
            wrong=wrong[row : row + 1],
        )
        for row, length in enumerate(lengths.tolist())
    ]
    merged = merge_site_caches(singles)
    for site in SITES:
        a, b = batched[site.label], merged[site.label]
        assert torch.equal(a.token_index, b.token_index)
        assert torch.equal(a.feature_ids, b.feature_ids)
        torch.testing.assert_close(a.activations, b.activations)
        torch.testing.assert_close(a.gradients, b.gradients)


def test_top_k_keeps_largest_and_records_dropped_mass(tiny_model, tiny_saes):
    saes = tiny_saes(tiny_model, SITES)
    tokens, lengths, answer, wrong = _batch()
    full = cache_batch(tiny_model, saes, tokens, lengths, MetricSpec(), answer=answer, wrong=wrong)
    top = cache_batch(
        tiny_model, saes, tokens, lengths, MetricSpec(), answer=answer, wrong=wrong, top_k=3
    )
    for site in SITES:
        dense_full, dense_top = full[site.label].dense(), top[site.label].dense()
        assert int((dense_top != 0).sum(-1).max()) <= 3
        kept = dense_top != 0
        torch.testing.assert_close(dense_top[kept], dense_full[kept])
        # Every kept value is ≥ every dropped value of its token.
        dropped = torch.where(kept, torch.zeros_like(dense_full), dense_full)
        smallest_kept = torch.where(kept, dense_top, torch.full_like(dense_top, torch.inf))
        assert bool((dropped.max(-1).values <= smallest_kept.min(-1).values).all())
        torch.testing.assert_close(
            top[site.label].dropped_mass, dense_full.sum(-1) - dense_top.sum(-1)
        )
        assert float(top[site.label].dropped_mass.sum()) > 0


def test_gradients_need_a_metric(tiny_model, tiny_saes):
    saes = tiny_saes(tiny_model, SITES)
    tokens, lengths, _, _ = _batch()
    with pytest.raises(ValueError, match="needs a metric"):
        cache_batch(tiny_model, saes, tokens, lengths, None)


def test_pad_right_rejects_empty_prompts():
    tokens, lengths = pad_right([[5, 6, 7], [8]])
    assert tokens.tolist() == [[5, 6, 7], [8, 0, 0]] and lengths.tolist() == [3, 1]
    with pytest.raises(TokenizationError, match="at least one token"):
        pad_right([[1], []])


@pytest.fixture(scope="module")
def tokenizer_model():
    """A tiny random model carrying the default model's real tokenizer."""
    from circuitscan.services.model_loading import load_tokenizer
    from circuitscan.testing import build_tiny_model

    tokenizer = load_tokenizer()
    model = build_tiny_model(d_vocab=len(tokenizer), d_model=8, n_heads=2, d_head=4, d_mlp=8)
    model.set_tokenizer(tokenizer)
    return model


def test_tokenize_prompts_prepends_bos_and_checks_answers(tokenizer_model):
    prompts = [
        PromptRecord(
            text="When Mary and John went out, John gave it to", answer=" Mary", wrong=" John"
        ),
        PromptRecord(text="Hello", answer=" Mary", wrong=" John"),
    ]
    batch = tokenize_prompts(tokenizer_model, prompts)
    bos = tokenizer_model.tokenizer.bos_token_id
    assert batch.tokens[:, 0].tolist() == [bos, bos]
    assert (
        batch.lengths[1] == 2
        and batch.token_lists()[1][1:]
        == tokenizer_model.to_tokens("Hello", prepend_bos=False)[0].tolist()
    )
    assert batch.answer.tolist() == [single_token(tokenizer_model, " Mary")] * 2
    bad = [PromptRecord(text="x", answer=" Maryland-Ontario", wrong=" John")]
    with pytest.raises(TokenizationError, match=r"Maryland-Ontario.*single token"):
        tokenize_prompts(tokenizer_model, bad)


@pytest.mark.parametrize("architecture", ["standard", "topk"])
@pytest.mark.parametrize("site", SITES, ids=lambda s: s.label)
def test_sparse_reconstruction_error_equals_dense_decode(tiny_model, architecture, site):
    """The sparse product gives sae_lens's own decode, decoder-norm rescaling included."""
    from circuitscan.pipelines.caching import reconstruction_error_norm
    from circuitscan.pipelines.sae_decoding import decodes_linearly
    from circuitscan.testing import build_tiny_sae

    sae = build_tiny_sae(tiny_model, site, architecture=architecture, k=4)
    if architecture == "topk":  # rows of unequal norm, divided out in decode
        sae.cfg.rescale_acts_by_decoder_norm = True
        with torch.no_grad():
            sae.W_dec.mul_(torch.linspace(0.5, 2.0, sae.W_dec.shape[0])[:, None].double())
    tokens, _, _, _ = _batch()
    _, cache = tiny_model.run_with_cache(tokens)
    x = cache[site.hook_name].flatten(0, 1)
    with torch.no_grad():
        acts = sae.encode(x)
        dense = (x - sae.decode(acts)).flatten(1).norm(dim=-1)
        assert decodes_linearly(sae)
        torch.testing.assert_close(reconstruction_error_norm(sae, x, acts), dense)
        # A hook on the reconstruction could change it: the dense decode runs it.
        sae.hook_sae_recons.add_hook(lambda out, hook: out * 2.0)
        assert not decodes_linearly(sae)
        doubled = (x - sae.decode(acts)).flatten(1).norm(dim=-1)
        torch.testing.assert_close(reconstruction_error_norm(sae, x, acts), doubled)
        sae.hook_sae_recons.remove_hooks()
