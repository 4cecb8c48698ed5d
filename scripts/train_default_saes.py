"""Retrain the SAEs shipped for the default model: ``python scripts/train_default_saes.py``.

Everything is offline and seeded. The text is docstrings from Python's own
standard library plus templated IOI sentences (the task every later job
starts with); activations come from the default model run only up to the
deepest hooked layer, once, for all SAEs; each SAE is then trained with
sae_lens's ``SAETrainer`` (TopK, with its dead-latent auxiliary loss) on
shuffled passes over those activations. Weights are saved as float16
safetensors (cfg.json keeps ``dtype: float32``, so ``SAE.load_from_disk``
restores float32), then ``scripts/eval_default_saes.py`` writes eval.json
next to each SAE.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.config import SAETrainerConfig
from sae_lens.training.sae_trainer import SAETrainer
from safetensors.torch import load_file, save_file

from circuitscan.pipelines.tasks.ioi import generate_ioi
from circuitscan.schemas.hooks import HookSite
from circuitscan.services.model_loading import load_model

log = logging.getLogger("train_default_saes")

OUT_DIR = Path(__file__).resolve().parents[1] / "services" / "default_saes"
# name -> (site, d_sae, k)
SAES: dict[str, tuple[HookSite, int, int]] = {
    "L15.resid_post": (HookSite(layer=15, point="resid_post"), 2304, 32),
    "L15.z": (HookSite(layer=15, point="z"), 2304, 32),
}
CONTEXT = 64  # tokens per sequence, BOS included
IOI_FRACTION = 0.15


def stdlib_docstrings() -> Iterator[str]:
    """Docstrings of the standard library's modules, classes and functions, in path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if any(
            part in {"test", "tests", "idlelib", "site-packages", "lib2to3"} for part in path.parts
        ):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    yield doc


def chunk(ids: list[int], bos: int, n_seqs: int) -> torch.Tensor:
    """``n_seqs`` rows of BOS + CONTEXT-1 consecutive tokens from the stream ``ids``."""
    body = CONTEXT - 1
    if len(ids) < n_seqs * body:
        raise SystemExit(f"corpus too small: {len(ids)} tokens for {n_seqs} sequences")
    rows = torch.tensor(ids[: n_seqs * body]).reshape(n_seqs, body)
    return torch.cat([torch.full((n_seqs, 1), bos), rows], dim=1)


def build_corpus(tokenizer, n_seqs: int, seed: int) -> torch.Tensor:
    """Token rows [n_seqs, CONTEXT]: stdlib docstrings and IOI sentences, shuffled."""
    n_ioi = int(n_seqs * IOI_FRACTION)
    n_doc = n_seqs - n_ioi
    needed = n_doc * (CONTEXT - 1)
    doc_ids: list[int] = []
    for doc in stdlib_docstrings():
        doc_ids.extend(tokenizer.encode(doc + "\n\n", add_special_tokens=False))
        if len(doc_ids) >= needed:
            break
    sentences = generate_ioi(tokenizer, n_ioi * 4, seed=seed + 1)
    ioi_text = " ".join(f"{r.text}{r.answer}." for r in sentences)
    ioi_ids = tokenizer.encode(ioi_text, add_special_tokens=False)
    bos = tokenizer.bos_token_id
    rows = torch.cat([chunk(doc_ids, bos, n_doc), chunk(ioi_ids, bos, n_ioi)])
    order = torch.randperm(n_seqs, generator=torch.Generator().manual_seed(seed))
    return rows[order]


@torch.no_grad()
def collect_activations(model, tokens: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
    """Per SAE name, activations [n_tokens, d_in] (hook_z flattened over heads)."""
    hooks = {site.hook_name: name for name, (site, _, _) in SAES.items()}
    stop = max(site.layer for site, _, _ in SAES.values()) + 1
    out: dict[str, list[torch.Tensor]] = {name: [] for name in SAES}
    start = time.perf_counter()
    for index in range(0, len(tokens), batch):
        _, cache = model.run_with_cache(
            tokens[index : index + batch], names_filter=list(hooks), stop_at_layer=stop
        )
        for hook, name in hooks.items():
            acts = cache[hook]
            out[name].append(
                acts.reshape(-1, acts.shape[-2] * acts.shape[-1])
                if acts.ndim == 4
                else acts.reshape(-1, acts.shape[-1])
            )
        done = index + batch
        if (index // batch) % 10 == 0:
            rate = done * tokens.shape[1] / (time.perf_counter() - start)
            log.info("activations: %d/%d sequences, %.0f tokens/s", done, len(tokens), rate)
    return {name: torch.cat(parts) for name, parts in out.items()}


def batches(acts: torch.Tensor, batch: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless shuffled passes over ``acts``: the data provider sae_lens's trainer pulls from."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(acts), generator=generator)
        for index in range(0, len(order) - batch + 1, batch):
            yield acts[order[index : index + batch]]


def train_one(name: str, acts: torch.Tensor, args, seed: int) -> TopKTrainingSAE:
    site, d_sae, k = SAES[name]
    torch.manual_seed(seed)
    # hook_z reshaping is switched on after training: the trainer feeds flat
    # [batch, n_heads·d_head] rows, which the reshaping would misread.
    cfg = TopKTrainingSAEConfig(
        d_in=acts.shape[-1],
        d_sae=d_sae,
        k=k,
        dtype="float32",
        device="cpu",
        normalize_activations="expected_average_only_in",
        aux_loss_coefficient=1 / 32,
    )
    sae = TopKTrainingSAE(cfg)
    steps = args.epochs * len(acts) // args.batch
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * args.batch,
        train_batch_size_samples=args.batch,
        lr=args.lr,
        lr_end=args.lr / 10,
        lr_scheduler_name="constant",
        lr_warm_up_steps=max(steps // 20, 1),
        lr_decay_steps=steps // 4,
        device="cpu",
        # a feature silent for this many steps (~30k tokens) counts as dead and
        # gets the auxiliary loss; the default (1000 steps) exceeds the whole run
        dead_feature_window=max(30_000 // args.batch, 5),
        feature_sampling_window=10**9,
        n_batches_for_norm_estimate=20,
    )
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=batches(acts, args.batch, seed))
    start = time.perf_counter()
    sae = trainer.fit()
    log.info("%s: %d steps in %.0fs", name, steps, time.perf_counter() - start)
    sae.cfg.metadata.hook_name = site.hook_name
    sae.cfg.metadata.model_name = "HuggingFaceTB/SmolLM2-135M-Instruct"
    sae.cfg.metadata.context_size = CONTEXT
    sae.cfg.metadata.prepend_bos = True
    sae.cfg.metadata.dataset_path = "python-stdlib-docstrings+ioi-templates"
    if site.point == "z":
        sae.cfg.reshape_activations = "hook_z"
    return sae


def save_half(sae, directory: Path, extra: dict) -> None:
    """Save with sae_lens, then store the weights as float16 (cfg keeps float32)."""
    directory.mkdir(parents=True, exist_ok=True)
    weights, _cfg_path = sae.save_inference_model(directory)
    state = load_file(weights)
    save_file({key: value.to(torch.float16).contiguous() for key, value in state.items()}, weights)
    (directory / "training.json").write_text(json.dumps(extra, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-seqs", type=int, default=3000, help="training sequences of 64 tokens")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--skip-eval", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    model = load_model().model
    tokens = build_corpus(model.tokenizer, args.n_seqs, args.seed)
    acts = collect_activations(model, tokens, batch=32)
    seconds_acts = time.perf_counter() - start
    log.info("collected %d tokens of activations in %.0fs", tokens.numel(), seconds_acts)
    del model
    for offset, name in enumerate(SAES):
        t0 = time.perf_counter()
        sae = train_one(name, acts[name], args, seed=args.seed + offset)
        extra = {
            "seed": args.seed,
            "train_tokens": int(tokens.numel()),
            "context": CONTEXT,
            "epochs": args.epochs,
            "batch": args.batch,
            "lr": args.lr,
            "threads": args.threads,
            "activation_seconds": round(seconds_acts, 1),
            "training_seconds": round(time.perf_counter() - t0, 1),
            "architecture": "topk",
            "k": sae.cfg.k,
            "text": "Python stdlib docstrings (85%) + templated IOI sentences (15%)",
        }
        save_half(sae, args.out / name, extra)
        log.info("saved %s", args.out / name)
        del acts[name]
    log.info("total %.0fs", time.perf_counter() - start)
    if not args.skip_eval:
        sys.path.insert(0, str(Path(__file__).parent))
        from eval_default_saes import main as evaluate

        evaluate(["--seed", str(args.seed)])


if __name__ == "__main__":
    main()
