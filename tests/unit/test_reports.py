"""Offline HTML reports: every plot renders from real analysis results; no network references."""

from __future__ import annotations

import re

import pytest
import torch

from circuitscan.pipelines.analyses import (
    Pruning,
    dfa,
    qk_feature_pairs,
    qk_pair_variance,
    recursive_dfa,
    splice_eval,
)
from circuitscan.schemas.hooks import HookSite
from circuitscan.schemas.metrics import MetricSpec
from circuitscan.services.reports import (
    Figure,
    Section,
    Table,
    atp_vs_exact_scatter,
    attribution_bars,
    dfa_heatmap,
    qk_pair_heatmap,
    render_dfa_html,
    render_dfa_text,
    splice_eval_chart,
    variance_explained_curve,
    write_report,
)
from circuitscan.services.reports.html_report import ReportError
from circuitscan.testing import build_tiny_model, build_tiny_sae

PNG = b"\x89PNG\r\n\x1a\n"


def test_full_report_from_tiny_model_results(tmp_path):
    model = build_tiny_model(n_layers=2, normalization="RMS", positional="rotary")
    saes = [
        build_tiny_sae(model, HookSite(layer=0, point="z"), seed=1),
        build_tiny_sae(model, HookSite(layer=1, point="resid_pre"), seed=2),
        build_tiny_sae(model, HookSite(layer=1, point="z"), seed=3),
    ]
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 40, (4, 8), generator=gen)
    lengths = torch.full((4,), 8)
    rows = splice_eval(
        model, saes, tokens, lengths, MetricSpec(), tokens[:, 1], tokens[:, 2],
        reference_tokens=tokens, reference_lengths=lengths,
    )  # fmt: skip
    one = dfa(model, saes, tokens[0], 5, 1, 7)
    tree = recursive_dfa(model, saes, tokens[0], 5, 1, 7, Pruning(max_depth=4, top_k=4))
    tables = [qk_feature_pairs(model, saes[1], t, 1, 2, 7, 3) for t in tokens]
    variance = qk_pair_variance(tables, top_n=5)
    plots = tmp_path / "plots"
    figures = [
        Figure(attribution_bars(["a", "b", "c"], [0.5, -1.0, 0.2], plots / "bars.png"), "bars"),
        Figure(
            atp_vs_exact_scatter(
                [1.0, 2.0, 0.1], [1.1, 1.8, 0.0], plots / "s.png", labels=["x", "y", "z"]
            ),
            "scatter",
        ),
        Figure(splice_eval_chart(rows, plots / "splice.png"), "splice"),
        Figure(dfa_heatmap(one, plots / "dfa.png"), "dfa"),
        Figure(qk_pair_heatmap(tables[0], plots / "qk.png"), "qk"),
        Figure(variance_explained_curve(variance, plots / "var.png"), "variance"),
    ]
    for fig in figures:
        assert fig.path.read_bytes().startswith(PNG)
    text = render_dfa_text(tree)
    assert text.splitlines()[0].endswith("[attn_feature]")
    sections = [
        Section(
            "Splice evaluation",
            paragraphs=["metric <b>& KL</b>"],
            tables=[
                Table(
                    ["sites", "variant", "metric"],
                    [["+".join(r.sites), r.variant, r.metric_mean] for r in rows],
                )
            ],
            figures=figures,
            preformatted=[text],
            raw_html=[render_dfa_html(tree)],
        )
    ]
    index = write_report(tmp_path / "report", sections, title="tiny")
    page = index.read_text()
    for fig in figures:
        assert (index.parent / fig.path.name).is_file()
        assert f"src='{fig.path.name}'" in page
    assert "&lt;b&gt;" in page  # text is escaped
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", page)  # fully offline
    assert page.count("<tr>") == len(rows) + 1


def test_missing_figure_is_a_clear_error(tmp_path):
    with pytest.raises(ReportError, match="does not exist"):
        write_report(tmp_path, [Section("x", figures=[Figure(tmp_path / "nope.png")])])


def test_analysis_runs_end_to_end_on_a_tiny_llama(tiny_hf_model_dir, tmp_path):
    """The service functions behind `circuitscan analyze`: IOI prompts → outputs → report."""
    import json

    from circuitscan.schemas.analyses import (
        DFAOutput,
        PatchPathOutput,
        QKPairsOutput,
        SpliceEvalOutput,
    )
    from circuitscan.schemas.models import ModelSpec
    from circuitscan.services.analysis_commands import (
        ioi_setup,
        run_dfa,
        run_head_feature_logit,
        run_patch_path,
        run_qk_pairs,
        run_splice_eval,
        save_outputs,
        splice_table,
        summary_lines,
    )
    from circuitscan.services.model_loading import load_model
    from circuitscan.services.reports import report_sections

    model = load_model(ModelSpec(source=str(tiny_hf_model_dir))).model
    saes = {
        s.label: build_tiny_sae(model, s, d_sae=48, seed=i)
        for i, s in enumerate([HookSite(layer=0, point="resid_post"), HookSite(layer=1, point="z")])
    }
    setup = ioi_setup(4, seed=1, model=model, model_name="tiny", saes=saes)
    splice = run_splice_eval(setup)
    assert isinstance(splice, SpliceEvalOutput) and splice.reference_prompts == 4
    assert [r.sites for r in splice.rows if r.variant == "spliced"] == [
        ["L0.resid_post"],
        ["L1.z"],
        ["L0.resid_post", "L1.z"],
    ]
    columns, rows = splice_table(splice)
    assert len(rows) == 3 and len(columns) == len(rows[0])
    hfl = run_head_feature_logit(setup)
    assert hfl.result.feature == int(hfl.result.feature) and hfl.result.heads[0].layer == 1
    tree = run_dfa(setup)
    assert isinstance(tree, DFAOutput) and tree.max_sum_error < 1e-4
    assert tree.result.dest_pos == setup.records[0].positions["END"]
    qk = run_qk_pairs(setup, top_n=5)
    assert isinstance(qk, QKPairsOutput) and len(qk.tables) == 4 and qk.variance.layer == 1
    for table, record in zip(qk.tables, setup.records, strict=True):
        assert (table.dest_pos, table.src_pos) == (record.positions["S2"], record.positions["S1"])
    path = run_patch_path(setup, ["v:L1:0@S1", "z:L0:1@END"], fractions=[0.5, 0.1])
    assert isinstance(path, PatchPathOutput) and path.fractions == [0.1, 0.5]
    assert [e.node for e in path.nodes] == ["v:L1:0@S1", "z:L0:1@END"]
    assert all(len(e.exact) == 4 and len(e.partial) == 2 for e in path.nodes)
    assert set(path.nodes[0].ranking_scores) == {"atp", "atpstar"}
    outputs = [splice, hfl, tree, qk, path]
    sections = report_sections(tmp_path, splice=splice, hfl=hfl, dfa=tree, qk=qk, path=path)
    index = save_outputs(tmp_path, outputs, sections, "tiny IOI")
    page = index.read_text()
    for png in ("splice_eval", "head_feature_logit", "dfa_heatmap", "qk_pairs", "qk_variance",
                "patch_path_0", "patch_path_1"):  # fmt: skip
        assert (tmp_path / f"{png}.png").read_bytes().startswith(PNG)
        assert f"src='{png}.png'" in page
    assert DFAOutput.model_validate(json.loads((tmp_path / "dfa.json").read_text())) == tree
    assert all(summary_lines(o) for o in outputs)

    # --store: the splice evaluation becomes the store's splice_eval result; the rest are JSON.
    from circuitscan.schemas.store import SiteLayout, StoreLayout
    from circuitscan.services.store import FeatureStore
    from circuitscan.services.store.backends import read_bytes
    from circuitscan.services.store.results import list_results, splice_eval_rows

    layout = StoreLayout(
        sites=[SiteLayout(label="L1.z", hook_name="blocks.1.attn.hook_z", d_sae=48,
                          sae_fingerprint="s")],
        shard_size=2, examples_per_feature=2, model_fingerprint="tiny", job_hash="cache",
    )  # fmt: skip
    url = str(tmp_path / "store")
    FeatureStore.create(url, layout)
    save_outputs(tmp_path / "again", outputs, sections, "tiny IOI", store=url)
    assert splice_eval_rows(url) == splice.rows
    assert [r.kind for r in list_results(url)] == ["splice_eval"]
    raw = read_bytes(FeatureStore.open(url).backend, "analyses/dfa.json")
    assert DFAOutput.model_validate_json(raw) == tree
    from circuitscan.services.store.analyses import read_analysis

    assert read_analysis(url, "dfa") == tree and read_analysis(url, "qk_pairs") == qk
    with pytest.raises(ValueError, match="no splice_eval analysis"):  # it is the job result
        read_analysis(url, "splice_eval")


def test_analyze_cli_rejects_bad_input_with_a_clear_message(tmp_path):
    from typer.testing import CliRunner

    from circuitscan.services.cli import app

    result = CliRunner().invoke(app, ["analyze", "dfa", "--prompts", "1"])
    assert result.exit_code == 2
    assert "at least 2 prompts" in result.output
    missing = tmp_path / "no" / "store"
    result = CliRunner().invoke(app, ["analyze", "ioi-report", "--store", str(missing)])
    assert result.exit_code == 2
    assert f"no feature store at {missing}" in result.output
    assert not (tmp_path / "no").exists()
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["analyze", "dfa", "--store", str(tmp_path / "empty")])
    assert result.exit_code == 2
    assert "no feature store at" in result.output
    (tmp_path / "notes.txt").write_text("mine")  # --out names a file: refused before any model
    result = CliRunner().invoke(app, ["analyze", "dfa", "--out", str(tmp_path / "notes.txt")])
    assert result.exit_code == 2
    assert "cannot write the dfa outputs to" in result.output and "it is a file" in result.output
    assert (tmp_path / "notes.txt").read_text() == "mine"
    # patch-path checks its nodes and fractions before loading any model.
    result = CliRunner().invoke(app, ["analyze", "patch-path", "v:16:0@S1"])
    assert result.exit_code == 2
    assert "not a node string: 'v:16:0@S1'" in result.output
    result = CliRunner().invoke(app, ["analyze", "patch-path", "z:L3:1@END", "--fraction", "0"])
    assert result.exit_code == 2
    assert "--fraction must be in (0, 1], got 0.0" in result.output
