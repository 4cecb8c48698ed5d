"""Circuit analyses on a job's prompt sources, and head→feature→logit's per-prompt contributions.

Every analysis runs from a JSONL source (examples/custom_task.jsonl) on the tiny
Llama; ``circuitscan analyze … --spec`` reads a job spec's prompts, metric,
model and SAEs; bad input is one line and exit 2. The prompt's contribution
of a head through a feature is checked by intervention on tiny float64 models.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from circuitscan.pipelines.analyses import (
    frozen_norm_scales,
    head_feature_logit,
    source_attention,
)
from circuitscan.pipelines.analyses.linear_parts import as_plain_sae
from circuitscan.pipelines.sae_splice import sae_encode
from circuitscan.schemas.hooks import HookSite
from circuitscan.testing import build_tiny_model, build_tiny_sae

ROOT = Path(__file__).resolve().parents[2]
CUSTOM = ROOT / "examples" / "custom_task.jsonl"


@pytest.mark.parametrize("normalization", ["LN", "RMS"])
def test_head_contribution_is_the_effect_of_removing_the_feature_from_what_the_head_reads(
    normalization,
):
    """Removing a_i·d_i from head h's value input at the source (patterns and norm scales
    frozen) changes logit[answer] − logit[wrong] at the destination by −contribution."""
    model = build_tiny_model(attn_only=True, normalization=normalization)
    site = HookSite(layer=0, point="resid_post")
    sae = build_tiny_sae(model, site, seed=1)
    tokens = torch.tensor([1, 5, 7, 9, 3, 11, 2, 8])
    src, dest, answer, wrong = 3, 7, 4, 6
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens[None])
        acts = sae_encode(sae, cache[site.hook_name])[0, src]
    feature = int(acts.argmax())
    activation = float(acts[feature])
    assert activation > 0
    final_scale, input_scales = frozen_norm_scales(model, tokens, src, dest)
    attention = source_attention(model, tokens, src, dest)
    result = head_feature_logit(
        model, sae, feature, answer, wrong, final_scale, input_scales=input_scales,
        activation=activation, attention=attention,
    )  # fmt: skip
    direction = as_plain_sae(sae).W_dec[feature].detach()

    model.set_use_split_qkv_input(True)  # one head's value input can then be edited alone
    try:
        with torch.no_grad():
            _, split = model.run_with_cache(tokens[None])
        scales = {name: split[name] for name in split if name.endswith("hook_scale")}

        def metric(hooks) -> float:
            with torch.no_grad():
                logits = model.run_with_hooks(tokens[None], fwd_hooks=hooks)
            return float(logits[0, dest, answer] - logits[0, dest, wrong])

        def frozen(x, hook):
            return scales[hook.name]

        base = metric([(name, frozen) for name in scales])
        assert len(result.heads) == model.cfg.n_heads  # layer 1 is the only reader
        for head in result.heads:

            def remove(x, hook, h=head.head):
                x = x.clone()
                x[0, src, h] -= activation * direction
                return x

            hooks = [(f"blocks.{head.layer}.hook_v_input", remove)]
            changed = metric(hooks + [(name, frozen) for name in scales])
            assert head.attention == pytest.approx(float(attention[head.layer, head.head]))
            assert head.contribution == pytest.approx(
                activation * head.attention * head.logit_diff, rel=1e-12
            )
            assert changed - base == pytest.approx(-head.contribution, abs=1e-10)
    finally:
        model.set_use_split_qkv_input(False)
    ranked = result.by_contribution()
    assert [abs(h.contribution) for h in ranked] == sorted(
        (abs(h.contribution) for h in result.heads), reverse=True
    )


@pytest.fixture(scope="module")
def tiny_llama(tiny_hf_model_dir):
    from circuitscan.schemas.models import ModelSpec
    from circuitscan.services.model_loading import load_model

    model = load_model(ModelSpec(source=str(tiny_hf_model_dir))).model
    saes = {
        s.label: build_tiny_sae(model, s, d_sae=48, seed=i)
        for i, s in enumerate([HookSite(layer=0, point="resid_post"), HookSite(layer=1, point="z")])
    }
    return model, saes


def test_every_analysis_runs_from_a_jsonl_source(tiny_llama):
    from circuitscan.services.analysis_prompts import analysis_inputs, prompt_setup
    from circuitscan.services.analysis_runs import (
        run_dfa,
        run_head_feature_logit,
        run_patch_path,
        run_qk_pairs,
        run_splice_eval,
    )
    from circuitscan.services.analysis_text import summary_lines
    from circuitscan.services.jobs.prompt_sources import load_prompts

    model, saes = tiny_llama
    inputs = analysis_inputs(prompts_file=CUSTOM, n_prompts=2)
    setup = prompt_setup(inputs, model=model, model_name="tiny", saes=saes)
    rows = load_prompts(inputs.source, lambda: None)[:2]
    assert setup.records == rows and setup.paired
    assert setup.context.task == "jsonl" and setup.context.n_prompts == 2
    assert json.loads(setup.context.source or "")["path"] == str(CUSTOM)

    splice = run_splice_eval(setup)
    assert splice.reference == "the prompts' corrupted counterparts"
    assert splice.reference_prompts == 2

    hfl = run_head_feature_logit(setup, src="SURNAME", prompt_index=1)
    assert (hfl.src_pos, hfl.dest_pos) == (rows[1].positions["SURNAME"], rows[1].positions["END"])
    assert (hfl.answer, hfl.wrong) == (rows[1].answer, rows[1].wrong) == (" golf", " basketball")
    assert all(h.contribution is not None and h.attention is not None for h in hfl.result.heads)
    text = summary_lines(hfl)
    assert "heads by |logit diff per unit|" in text and "the prompt's own ranking" in text

    tree = run_dfa(setup)  # dest: the rows' own END
    assert tree.result.dest_pos == rows[0].positions["END"] and tree.max_sum_error < 1e-4

    qk = run_qk_pairs(setup, dest="END", src="NAME", top_n=3)
    assert [(t.dest_pos, t.src_pos) for t in qk.tables] == [
        (r.positions["END"], r.positions["NAME"]) for r in rows
    ]
    path = run_patch_path(setup, ["v:L1:1@SURNAME"], fractions=[0.5])
    assert path.corruption == "the prompts' corrupted counterparts"
    assert [len(node.exact) for node in path.nodes] == [2]


def test_analyses_refuse_what_the_prompts_do_not_carry(tiny_llama, tmp_path):
    from circuitscan.pipelines.analyses import AnalysisInputError
    from circuitscan.services.analysis_prompts import analysis_inputs, prompt_setup
    from circuitscan.services.analysis_runs import (
        run_head_feature_logit,
        run_patch_path,
        run_qk_pairs,
    )

    model, saes = tiny_llama
    setup = prompt_setup(analysis_inputs(prompts_file=CUSTOM, n_prompts=2), model=model, saes=saes)
    with pytest.raises(AnalysisInputError, match=r"needs --dest and --src.*END, NAME, SURNAME"):
        run_qk_pairs(setup)
    with pytest.raises(AnalysisInputError, match="prompt 0 names no position 'IO'"):
        run_head_feature_logit(setup, src="IO")
    with pytest.raises(AnalysisInputError, match="token 40 of prompt 0, which has only 9"):
        run_head_feature_logit(setup, src=40)
    plain = tmp_path / "plain.jsonl"
    plain.write_text(
        "".join(json.dumps({"text": t, "answer": " a", "wrong": " b"}) + "\n" for t in "xy")
    )
    unpaired = prompt_setup(analysis_inputs(prompts_file=plain), model=model, saes=saes)
    assert unpaired.reference_label.startswith("the prompts themselves")
    with pytest.raises(AnalysisInputError, match="prompt 0 has no 'corrupted' text"):
        run_patch_path(unpaired, ["z:L1:0@last"])


def _spec(tmp_path: Path, model_dir: Path, sae_dirs: list[Path]) -> Path:
    saes = ", ".join(f"{{source: {d}}}" for d in sae_dirs)
    spec = tmp_path / "job.yaml"
    spec.write_text(
        f"model: {{source: {model_dir}}}\nsaes: [{saes}]\n"
        f"prompts: {{kind: jsonl, path: {CUSTOM}}}\nmetric: {{kind: logit_diff}}\n"
        f"job: {{kind: cache}}\nstore: {tmp_path / 'unused'}\n"
    )
    return spec


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def test_analyze_cli_takes_a_spec_and_refuses_bad_input_in_one_line(
    tiny_hf_model_dir, tiny_hf_sae_dirs, tmp_path
):
    from circuitscan.services.cli import app

    spec = _spec(tmp_path, tiny_hf_model_dir, tiny_hf_sae_dirs)
    out = tmp_path / "hfl"
    run = CliRunner().invoke(
        app,
        ["analyze", "head-feature-logit", "--spec", str(spec), "--prompts", "2", "--src",
         "SURNAME", "--out", str(out)],
    )  # fmt: skip
    assert run.exit_code == 0, run.output
    assert "the prompt's own ranking" in run.output
    written = json.loads((out / "head_feature_logit.json").read_text())
    assert written["context"]["task"] == "jsonl" and written["context"]["n_prompts"] == 2
    assert written["answer"] == " basketball" and written["src_pos"] == 4

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "answer": " b"}\n{"text": "a", "answr": " b"}\n')
    cases = [
        (["--prompts-file", str(tmp_path / "nope.jsonl")], "prompt source not found"),
        (["--prompts-file", str(bad)], "bad.jsonl:2: not a valid prompt record: answr"),
        (["--spec", str(spec), "--prompts-file", str(bad)], "give --spec or --prompts-file"),
        (["--spec", str(tmp_path / "missing.yaml")], "spec file not found"),
        (["--spec", str(spec), "--metric", "accuracy"], "--metric must be logit_diff"),
        (["--spec", str(spec), "--dest", "NOPE"], "names no position 'NOPE'"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(app, ["analyze", "dfa", *args, "--out", str(tmp_path / "x")])
        assert result.exit_code == 2, (args, result.output)
        lines = _error_lines(result.output)
        assert len(lines) == 1 and "Traceback" not in result.output, result.output
        assert message in lines[0], result.output
