"""Evaluate the SAEs shipped for the default model: ``python scripts/eval_default_saes.py``.

On held-out text (standard-library docstrings past the stretch the training
run consumed, plus IOI sentences from another seed) each SAE gets:

- explained variance: 1 − Σ‖x − x̂‖² / Σ‖x − mean(x)‖² over tokens (BOS excluded,
  its activation norm is an outlier no SAE is trained to reconstruct);
- L0: mean number of active features per token;
- dead fraction: features that never fire on the held-out tokens;
- the IOI logit difference (IO − S, last position) of the clean model and with
  the SAE spliced in *without* its error term.

Writes ``eval.json`` next to each SAE and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from train_default_saes import CONTEXT, IOI_FRACTION, chunk, stdlib_docstrings

from circuitscan.pipelines.batching import tokenize_prompts
from circuitscan.pipelines.metrics import metric_per_prompt
from circuitscan.pipelines.tasks.ioi import generate_ioi
from circuitscan.schemas.metrics import MetricSpec
from circuitscan.services.model_loading import load_model
from circuitscan.services.sae_loading import default_sae_root, load_default_saes

TRAIN_SEQS = 3000  # train_default_saes.py's default --n-seqs: its docstring stretch is skipped


def held_out_tokens(tokenizer, n_seqs: int, seed: int) -> torch.Tensor:
    """[n_seqs, CONTEXT] rows of text the training run did not see."""
    skip = int(TRAIN_SEQS * (1 - IOI_FRACTION)) * (CONTEXT - 1)
    n_ioi = int(n_seqs * IOI_FRACTION)
    n_doc = n_seqs - n_ioi
    ids: list[int] = []
    for doc in stdlib_docstrings():
        ids.extend(tokenizer.encode(doc + "\n\n", add_special_tokens=False))
        if len(ids) >= skip + n_doc * (CONTEXT - 1):
            break
    sentences = generate_ioi(tokenizer, n_ioi * 4, seed=seed + 1000)
    ioi_ids = tokenizer.encode(
        " ".join(f"{r.text}{r.answer}." for r in sentences), add_special_tokens=False
    )
    bos = tokenizer.bos_token_id
    return torch.cat([chunk(ids[skip:], bos, n_doc), chunk(ioi_ids, bos, n_ioi)])


@torch.no_grad()
def reconstruction_figures(model, loaded, tokens: torch.Tensor) -> dict[str, float]:
    sae, hook = loaded.sae, loaded.site.hook_name
    stop = loaded.site.layer + 1
    sq_err = sq_dev = 0.0
    total = torch.zeros(0)
    n_tokens = 0
    active = 0.0
    fired = torch.zeros(int(sae.cfg.d_sae), dtype=torch.bool)
    xs = []
    for start in range(0, len(tokens), 32):
        _, cache = model.run_with_cache(
            tokens[start : start + 32], names_filter=[hook], stop_at_layer=stop
        )
        xs.append(cache[hook][:, 1:].flatten(0, 1))  # drop BOS
    x = torch.cat(xs)
    total = x.flatten(1).mean(0)
    for part in x.split(4096):
        feats = sae.encode(part)
        recon = sae.decode(feats)
        sq_err += float((recon - part).flatten(1).pow(2).sum())
        sq_dev += float((part.flatten(1) - total).pow(2).sum())
        active += float((feats > 0).sum())
        fired |= (feats > 0).any(0)
        n_tokens += part.shape[0]
    return {
        "explained_variance": 1 - sq_err / sq_dev,
        "l0": active / n_tokens,
        "dead_fraction": 1 - float(fired.float().mean()),
        "eval_tokens": n_tokens,
    }


@torch.no_grad()
def ioi_logit_diffs(model, loaded_saes, n_prompts: int, seed: int) -> dict[str, float]:
    records = generate_ioi(model.tokenizer, n_prompts, seed=seed + 2000)
    batch = tokenize_prompts(model, records)
    spec = MetricSpec()

    def mean_diff(logits: torch.Tensor) -> float:
        per = metric_per_prompt(
            logits, spec, lengths=batch.lengths, answer=batch.answer, wrong=batch.wrong
        )
        return float(per.mean())

    out = {"clean": mean_diff(model(batch.tokens))}
    for loaded in loaded_saes:
        logits = model.run_with_saes(batch.tokens, saes=[loaded.sae], use_error_term=False)
        out[loaded.name] = mean_diff(logits)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-seqs", type=int, default=200, help="held-out sequences of 64 tokens")
    parser.add_argument("--ioi-prompts", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = load_model().model
    loaded_saes = load_default_saes(model)
    tokens = held_out_tokens(model.tokenizer, args.n_seqs, args.seed)
    diffs = ioi_logit_diffs(model, loaded_saes, args.ioi_prompts, args.seed)
    rows = []
    for loaded in loaded_saes:
        figures = reconstruction_figures(model, loaded, tokens)
        figures.update(
            ioi_logit_diff_clean=diffs["clean"],
            ioi_logit_diff_spliced=diffs[loaded.name],
            ioi_prompts=args.ioi_prompts,
            d_sae=int(loaded.sae.cfg.d_sae),
            hook_name=loaded.site.hook_name,
        )
        (default_sae_root() / loaded.name / "eval.json").write_text(
            json.dumps(figures, indent=2) + "\n"
        )
        rows.append((loaded.name, figures))
    print(
        "| SAE | hook | d_sae | explained variance | L0 | dead | IOI logit diff clean → spliced |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, f in rows:
        print(
            f"| {name} | `{f['hook_name']}` | {f['d_sae']} | {f['explained_variance']:.3f} | "
            f"{f['l0']:.1f} | {f['dead_fraction']:.1%} | "
            f"{f['ioi_logit_diff_clean']:.2f} → {f['ioi_logit_diff_spliced']:.2f} |"
        )


if __name__ == "__main__":
    main()
