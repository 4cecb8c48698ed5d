// circuitscan browser views: feature pages, result figures and head pages.
// Loaded before app.js, whose helpers ($, api, el, fmt, state, storePath, sitePath) these use
// when called. Figures are the server's SVG markup (the report's own), inserted as they come.
"use strict";

function svgFigures(figures) {
  return figures.map((figure) => {
    const holder = el("div", { class: "figure-box", "data-name": figure.name });
    holder.innerHTML = figure.svg; // server-built SVG: values escaped there, no scripts
    return holder;
  });
}

// One example: each token shaded by the feature's value there, the hit outlined.
function valuedContext(example, scale) {
  const tokens = example.tokens || example.token_ids.map((id) => `[${id}]`);
  return el("span", { class: "context" }, ...tokens.map((text, i) => {
    const value = example.values[i];
    const alpha = scale > 0 ? Math.min(1, Math.max(0, value) / scale) : 0;
    const node = el("span", { class: i === example.hit_index ? "vtok peak" : "vtok", text,
                              title: `activation ${fmt(value)}`, "data-value": String(value) });
    node.style.background = `rgba(247, 144, 9, ${alpha.toFixed(2)})`;
    return node;
  }));
}

function exampleItems(examples, scale) {
  return examples.map((ex) => el("li", { "data-prompt": ex.prompt }, valuedContext(ex, scale),
    el("span", { class: "act", text: `prompt ${ex.prompt} pos ${ex.position} · act ${fmt(ex.activation)}` })));
}

async function showFeatureViews(feature) {
  const base = sitePath() + "/features/" + feature;
  const [page, figures] = await Promise.all([api(base + "/page"), api(base + "/figures")]);
  const scale = Math.max(page.summary.max, ...page.top.map((ex) => ex.activation), 0);
  $("feature-density").textContent =
    `density ${fmt(page.density, 3)} · histogram of ${page.histogram.covered} activations`;
  $("feature-figures").replaceChildren(...svgFigures(figures));
  $("valued-examples").replaceChildren(...exampleItems(page.top, scale));
  $("sampled-examples").replaceChildren(...(page.sampled.length ? exampleItems(page.sampled, scale)
    : [el("li", { text: "no weaker examples in the sampled shards" })]));
  $("feature-notes").replaceChildren(...page.notes.map((note) => el("li", { text: note })));
  markWidth();
}

async function showResultFigures() {
  const figures = await api(storePath() + "/figures");
  $("result-figures").replaceChildren(...svgFigures(figures));
  markWidth();
}

// ?head=LAYER.HEAD: the head's nodes in the store's attribute result (read at load: app.js
// rewrites the address without it).
const headParam = new URLSearchParams(location.search).get("head");

async function showHead() {
  const head = headParam;
  $("head-view").hidden = !head;
  if (!head) return;
  const [layer, index] = head.split(".").map(Number);
  const page = await api(storePath() + `/heads/${layer}/${index}`);
  $("head-title").textContent = `L${page.layer}.${page.head}`;
  const rows = page.nodes.map((n) => el("tr", { "data-node": n.node }, el("td", { text: n.node }),
    el("td", { text: fmt(n.estimate) }), el("td", { text: n.exact == null ? "—" : fmt(n.exact) })));
  $("head-nodes").tBodies[0].replaceChildren(...(rows.length ? rows
    : [el("tr", {}, el("td", { text: "no node of this head among the stored top nodes" }))]));
  markWidth();
}

// The page's full width, for checking that nothing needs horizontal scrolling.
function markWidth() {
  document.body.dataset.scrollWidth = String(document.documentElement.scrollWidth);
}
