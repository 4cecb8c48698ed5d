"""Offline HTML reports with matplotlib plots for the analyses and attribution jobs.

- ``write_report(out_dir, sections, title=...) -> Path`` writes ``index.html`` (no CDN,
  no scripts; figures are PNG files next to it).
- ``Section``, ``Table``, ``Figure``: what a report is made of (plain data).
- plots (each ``(..., path) -> Path`` writing one PNG): ``attribution_bars``,
  ``atp_vs_exact_scatter``, ``splice_eval_chart``, ``dfa_heatmap``, ``qk_pair_heatmap``,
  ``variance_explained_curve``, ``patch_path_curves``.
- ``render_dfa_text(tree)`` / ``render_dfa_html(tree)``: a DFA tree as indented text / nested
  HTML lists.
- ``report_sections(out_dir, splice=..., hfl=..., dfa=..., qk=..., path=...)``: sections (tables, plots)
  for the analyses' outputs (``circuitscan.schemas.analyses.*Output``).
"""

from circuitscan.services.reports.analysis_sections import report_sections
from circuitscan.services.reports.dfa_render import render_dfa_html, render_dfa_text
from circuitscan.services.reports.html_report import Figure, Section, Table, write_report
from circuitscan.services.reports.plots import (
    atp_vs_exact_scatter,
    attribution_bars,
    dfa_heatmap,
    patch_path_curves,
    qk_pair_heatmap,
    splice_eval_chart,
    variance_explained_curve,
)

__all__ = [
    "Figure",
    "Section",
    "Table",
    "atp_vs_exact_scatter",
    "attribution_bars",
    "dfa_heatmap",
    "patch_path_curves",
    "qk_pair_heatmap",
    "render_dfa_html",
    "render_dfa_text",
    "report_sections",
    "splice_eval_chart",
    "variance_explained_curve",
    "write_report",
]
