"""A researcher's path through the Python API, ``import circuitscan as cs``.

Load a model and an SAE, build IOI prompt pairs, rank attention heads and SAE
features with AtP*, verify the top ones by exact patching, cache activations
and gradients, and query a feature store.

    python examples/python_api.py                  # tiny random model: seconds, checks the wiring
    python examples/python_api.py --default-model  # SmolLM2-135M-Instruct and its shipped SAEs

On the tiny model the numbers mean nothing (random weights); on the default
model the signed AtP* estimates of the top heads track their exact effects.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import circuitscan as cs


def tiny_model_and_saes(folder: Path) -> tuple[Any, list[Any]]:
    """A tiny Llama and an SAE saved to disk, loaded the way your own would be."""
    from circuitscan.testing import build_tiny_sae, save_tiny_llama

    model = cs.load_model(save_tiny_llama(folder / "model"), device="cpu")
    build_tiny_sae(model, cs.HookSite.parse("L1.z"), d_sae=64).save_model(folder / "sae")
    return model, cs.load_saes(model, [folder / "sae"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--default-model", action="store_true", help="use SmolLM2 and its SAEs")
    parser.add_argument("--prompts", type=int, default=8, help="IOI prompt pairs")
    parser.add_argument("--store", help="a store written by `circuitscan run` to query")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="circuitscan-example-"))
    if args.default_model:
        model = cs.load_model()
        saes = cs.load_saes(model, ["default/L15.z"])
    else:
        model, saes = tiny_model_and_saes(folder)
    site = cs.HookSite.parse(str(saes[0].cfg.metadata.hook_name)).label

    # Prompt pairs: IOI prompts and their ABC-corrupted counterparts, with the
    # named positions IO, S1, S2 and END (strings and records work too).
    pairs = cs.PromptPairs.from_ioi(model, args.prompts, seed=0)
    print(f"{len(pairs)} pairs, e.g. {pairs.texts[0]!r}")

    # AtP* over head outputs and SAE features at the last token, then the top
    # ten verified by actually patching them.
    result = cs.attribute(
        model, saes, pairs, method="atpstar", nodes=["z", "feature"], positions=["END"]
    )
    top = result.top(10)
    exact = cs.exact_patch(model, saes, pairs, top).nanmean(0)
    # AtP* ranks by GradDrop's unsigned score; its signed estimate sits next to Δm.
    print(f"{'node':<28} {'AtP* rank score':>15} {'AtP* estimate':>13} {'exact Δm':>9}")
    for score, delta in zip(top, exact.tolist(), strict=True):
        print(f"{score.node:<28} {score.mean_abs:>15.3f} {score.mean:>13.3f} {delta:>9.3f}")

    # Activations and their gradients of the logit difference, every token.
    cached = cs.cache(model, saes, pairs)[site]
    print(f"cache: {cached.feature_ids.numel()} active (token, feature) entries over "
          f"{cached.n_tokens} tokens at {site}")  # fmt: skip

    # A store: the one given, or a small one written here from the same prompts.
    if args.store:
        url = args.store
    else:
        from circuitscan.testing import write_tiny_store

        records = [
            {"text": text, "answer": model.to_string(a), "wrong": model.to_string(w)}
            for text, a, w in zip(pairs.texts, pairs.answer, pairs.wrong, strict=True)
        ]
        url = write_tiny_store(str(folder / "store"), model, saes, records)
    store = cs.open_store(url)
    first = store.sites[0]
    active = store.features_at(prompt=0, position=int(pairs.lengths[0]) - 1, site=first, limit=3)
    print(f"store {store}: top features at prompt 0's last token: {active.feature_ids}")
    feature = active.feature_ids[0]
    summary = store.summary(feature, site=first)
    hits = store.top_examples(feature, site=first, n=3)
    print(f"feature {feature}: fires on {summary.count} tokens, max {summary.max:.3f}; "
          f"top prompts {[hit.prompt for hit in hits]}")  # fmt: skip


if __name__ == "__main__":
    main()
