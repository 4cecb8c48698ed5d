"""A DFA tree as indented text or nested HTML lists."""

from __future__ import annotations

import html

from circuitscan.schemas.analyses import DFANode


def render_dfa_text(node: DFANode, max_depth: int | None = None, _depth: int = 0) -> str:
    """One line per node, children indented under their parent, largest first."""
    line = f"{'  ' * _depth}{node.value:+.4f}  {node.label}  [{node.kind}]"
    if max_depth is not None and _depth >= max_depth:
        return line
    kids = sorted(node.children, key=lambda c: -abs(c.value))
    return "\n".join([line, *(render_dfa_text(c, max_depth, _depth + 1) for c in kids)])


def render_dfa_html(node: DFANode) -> str:
    """Nested <ul> lists; positive values green, negative red."""
    return f"<ul class='tree'>{_li(node)}</ul>"


def _li(node: DFANode) -> str:
    colour = "#1a7f37" if node.value >= 0 else "#cf222e"
    label = html.escape(f"{node.label} [{node.kind}]")
    item = f"<span style='color:{colour}'>{node.value:+.4f}</span> {label}"
    if not node.children:
        return f"<li>{item}</li>"
    kids = "".join(_li(c) for c in sorted(node.children, key=lambda c: -abs(c.value)))
    return f"<li>{item}<ul>{kids}</ul></li>"
