// circuitscan feature browser: plain JavaScript against the same-origin API, no external fetches.
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const state = { store: params.get("store"), site: params.get("site"),
                feature: params.get("feature"), prompt: params.get("prompt"), by: params.get("by") };

function setStatus(text, isError) {
  $("status").textContent = text || "";
  $("status").className = isError ? "error" : "";
}

async function api(path) {
  const headers = {};
  const token = sessionStorage.getItem("circuitscan-token");
  if (token) headers["Authorization"] = "Bearer " + token;
  const response = await fetch(path, { headers });
  const body = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(body.error || ("HTTP " + response.status));
  return body;
}

const enc = encodeURIComponent;
const storePath = () => "/api/stores/" + enc(state.store);
const sitePath = () => storePath() + "/sites/" + enc(state.site);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function fmt(x, digits = 4) {
  return Number(x).toPrecision(digits).replace(/\.?0+$/, "").replace(/\.?0+e/, "e");
}

function fillSelect(select, options, chosen) {
  select.replaceChildren(...options.map(([value, label]) => el("option", { value, text: label })));
  if (chosen !== null && chosen !== undefined) select.value = String(chosen);
}

function syncUrl() {
  const query = new URLSearchParams();
  for (const key of ["store", "site", "feature", "prompt", "by"]) {
    if (state[key] !== null && state[key] !== "") query.set(key, state[key]);
  }
  history.replaceState(null, "", "?" + query.toString());
}

async function loadStores() {
  const page = await api("/api/stores?limit=100");
  if (!page.items.length) throw new Error("no stores under the server's store root");
  if (!state.store || !page.items.some((s) => s.name === state.store)) state.store = page.items[0].name;
  fillSelect($("store"), page.items.map((s) => [s.name, `${s.name} (${s.n_prompts} prompts)`]), state.store);
}

async function loadStore() {
  const info = await api(storePath());
  const sites = info.layout.sites.map((s) => s.label);
  // Attribute stores hold job results and no SAE cache: no site, no feature to pick.
  state.hasSites = sites.length > 0;
  if (!sites.includes(state.site)) state.site = sites[0] ?? null;
  fillSelect($("site"), info.layout.sites.map((s) => [s.label, `${s.label} (${s.d_sae})`]), state.site);
  $("site").disabled = $("feature").disabled = $("prompt").disabled = !state.hasSites;
  if (!state.hasSites) {
    state.feature = state.prompt = null;
    fillSelect($("prompt"), [["", "—"]], "");
    return;
  }
  $("feature").max = String(info.layout.sites.find((s) => s.label === state.site).d_sae - 1);
  const prompts = await api(storePath() + "/prompts?limit=100");
  const options = [["", "—"]].concat(prompts.items.map((p) =>
    [String(p.prompt), `${p.prompt}: ${p.text.slice(0, 48)}`]));
  fillSelect($("prompt"), options, state.prompt ?? "");
}

function contextNode(example) {
  const tokens = example.context || example.context_token_ids.map((id) => `[${id}]`);
  return el("span", { class: "context" }, ...tokens.map((text, i) =>
    el("span", { class: i === example.hit_index ? "tok hit" : "tok", text,
                 title: i === example.hit_index ? `activation ${fmt(example.activation)}` : "" })));
}

async function showFeature() {
  const feature = Number(state.feature);
  const base = sitePath() + "/features/" + feature;
  const [summary, examples] = await Promise.all([
    api(base + "/summary"), api(base + "/examples?limit=10&context=6")]);
  $("feature-title").textContent = `${feature} · ${state.site}`;
  const rows = [["count", summary.count], ["frequency", fmt(summary.frequency)],
                ["max activation", fmt(summary.max)], ["mean when active", fmt(summary.mean_when_active)],
                ["total activation", fmt(summary.total)]];
  $("summary").replaceChildren(...rows.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: String(v) })]));
  $("summary").dataset.feature = String(feature);
  const items = examples.examples.map((ex) => el("li", { "data-prompt": ex.prompt },
    contextNode(ex), el("span", { class: "act", text: `prompt ${ex.prompt} pos ${ex.position} · act ${fmt(ex.activation)}` })));
  $("examples").replaceChildren(...(items.length ? items : [el("li", { text: "this feature never fired" })]));
  await showFeaturePushes(feature);
  await showFeatureViews(feature); // views.js: histogram, logit effects, heads, sampled examples
  $("feature-view").hidden = false;
}

// Corpus-wide rankings by a·∂m/∂a come from the store's index (GET .../top-attributions); a
// store without gradients answers 404 and the ranking is left out.
async function showRankings() {
  let ranking = null;
  try { ranking = await api(sitePath() + "/top-attributions?limit=10"); } catch (error) { ranking = null; }
  $("rankings-view").hidden = ranking === null;
  if (ranking === null) return;
  // A paired cache also sums the AtP term (a' − a)·g per feature: shown beside a·g.
  const paired = ranking.error_atp !== null && ranking.error_atp !== undefined;
  $("rankings").querySelector("th.atp").hidden = !paired;
  const rows = ranking.rows.map((r) => {
    const row = el("tr", { "data-feature": r.feature }, el("td", { text: String(r.feature) }),
                   el("td", { text: fmt(r.value) }), el("td", { text: fmt(r.value_abs) }),
                   el("td", { text: String(r.count) }));
    if (paired) row.append(el("td", { text: fmt(r.atp) }));
    row.addEventListener("click", () => { state.feature = String(r.feature); $("feature").value = r.feature; render(); });
    return row;
  });
  $("rankings").tBodies[0].replaceChildren(...rows);
}

async function showFeaturePushes(feature) {
  let ranking = null;
  try { ranking = await api(sitePath() + `/top-attributions?feature=${feature}&per=prompt&limit=10`); } catch (error) { ranking = null; }
  const items = ranking === null ? [el("li", { text: "this store keeps no attribution sums" })]
    : ranking.rows.map((r) => el("li", { "data-prompt": r.prompt, text: `prompt ${r.prompt} · Σ a·g ${fmt(r.value)}` }));
  $("feature-pushes").replaceChildren(...(items.length ? items : [el("li", { text: "no stored entries" })]));
}

function featureChip(id, activation, attribution) {
  const value = attribution ?? activation;
  const sign = value > 0 ? "pos" : value < 0 ? "neg" : "zero";
  const chip = el("span", { class: "feat " + sign, "data-feature": id,
                            text: `f${id} ${value > 0 ? "+" : ""}${fmt(value, 3)}`,
                            title: `activation ${fmt(activation)}` + (attribution === null ? "" : ` · attribution ${fmt(attribution)}`) });
  chip.addEventListener("click", () => { state.feature = String(id); $("feature").value = id; render(); });
  return chip;
}

async function showPrompt() {
  const data = await api(sitePath() + "/prompts/" + Number(state.prompt) + "/features?limit=6");
  $("prompt-title").textContent = `${data.prompt} · ${data.site}`;
  $("prompt-text").textContent = data.text;
  const rows = data.positions.map((at, pos) => el("tr", {},
    el("td", { text: String(pos) }),
    el("td", { class: "token", text: data.tokens ? data.tokens[pos] : `[${at.token_id}]` }),
    el("td", {}, ...at.feature_ids.map((id, i) =>
      featureChip(id, at.activations[i], at.attributions ? at.attributions[i] : null)))));
  $("prompt-features").tBodies[0].replaceChildren(...rows);
  $("prompt-view").hidden = false;
}

const largest = (values) => values.reduce((best, v, i) => (Math.abs(v) > Math.abs(values[best]) ? i : best), 0);

// How each job kind's result is shown comes from the API (GET /api/result-views): the route to
// fetch, a title template and the table's columns, so a new kind needs no change here.
let resultViews = null;
const pick = (row, path) => path.split(".").reduce((value, key) => (value == null ? undefined : value[key]), row);

const CELLS = {
  text: (v) => String(v),
  num: (v) => fmt(v),
  num3: (v) => fmt(v, 3),
  joined: (v) => v.join("+") || "—",
  ratio: (v, row, column) => `${v}/${pick(row, column.over)}`,
  largest_index: (v, row, column) => `${column.prefix}${largest(v)} ${fmt(v[largest(v)], 3)}`,
  largest_entry: (v) => { const [name, x] = Object.entries(v)
    .reduce((best, e) => (Math.abs(e[1]) > Math.abs(best[1]) ? e : best), ["—", 0]); return `${name} ${fmt(x, 3)}`; },
};

function cellText(row, column) {
  const value = pick(row, column.field);
  return value == null ? "—" : CELLS[column.cell](value, row, column);
}

function titleText(template, result) {
  return template.replace(/\{(#?)([\w.]+)(?::(\w+))?\}/g, (_, count, path, format) => {
    const value = pick(result, path);
    if (count) return String(value.length);
    return format ? CELLS[format](value) : String(value);
  });
}

async function resultTable(kind) {
  const view = resultViews[kind];
  if (!view) return el("p", { text: `${kind}: no view for this result kind` });
  const result = await api(storePath() + "/results/" + view.query);
  const head = el("tr", {}, ...view.columns.map((column) => el("th", { text: column.name })));
  const body = pick(result, view.rows).map((row) =>
    el("tr", {}, ...view.columns.map((column) => el("td", { text: cellText(row, column) }))));
  // One line per note field the payload carries (a certificate such as "no unverified node exceeds θ").
  const notes = (view.notes || []).map((path) => pick(result, path)).filter((text) => text != null)
    .map((text) => el("p", { class: "note", text }));
  return el("div", { class: "result", "data-kind": kind }, el("h3", { text: titleText(view.title, result) }),
            ...notes, el("table", {}, el("thead", {}, head), el("tbody", {}, ...body)));
}

// A result broken down by a prompt field (GET /results/breakdown?by=): one row per item, for
// each group its quantities' means and n (prompts of the group where the item exists).
async function breakdownTable(kind) {
  const query = new URLSearchParams({ by: state.by, kind, top: "20" });
  const grouped = await api(storePath() + "/results/breakdown?" + query.toString());
  const names = Object.keys(grouped.quantities);
  const head = el("tr", {}, el("th", { text: "item" }), ...grouped.groups.flatMap((g) =>
    names.map((q) => el("th", { text: `${q} [${g.value}]`, title: grouped.quantities[q] }))
      .concat([el("th", { text: `n [${g.value}]` })])));
  const body = grouped.rows.map((row) => el("tr", {}, el("td", { text: row.item }),
    ...row.cells.flatMap((cell) => names.map((q) =>
      el("td", { text: cell.values[q] == null ? "—" : fmt(cell.values[q]) }))
      .concat([el("td", { text: String(cell.n_prompts) })]))));
  const sizes = grouped.groups.map((g) => `${g.value}: ${g.n_prompts}`).join(", ");
  return el("div", { class: "breakdown", "data-kind": kind },
            el("h3", { text: `${kind} by ${grouped.field} (${sizes})` }),
            el("table", {}, el("thead", {}, head), el("tbody", {}, ...body)));
}

async function showResults() {
  const held = await api(storePath() + "/results");
  if (held.length && !resultViews) resultViews = await api("/api/result-views");
  const parts = held.map((item) => resultTable(item.kind));
  if (state.by) {
    for (const item of held) {
      if (resultViews[item.kind] && resultViews[item.kind].breakdown) parts.push(breakdownTable(item.kind));
    }
  }
  $("results").replaceChildren(...await Promise.all(parts));
  $("results-view").hidden = held.length === 0;
  if (held.length) await showResultFigures(); // views.js: attribution maps, ablation, DFA
}

async function render() {
  document.body.dataset.state = "loading";
  syncUrl();
  try {
    setStatus("loading…");
    const work = [showResults(), showHead()];
    if (state.hasSites) work.push(showRankings()); else $("rankings-view").hidden = true;
    $("feature-view").hidden = state.feature === null || state.feature === "";
    $("prompt-view").hidden = state.prompt === null || state.prompt === "";
    if (!$("feature-view").hidden) work.push(showFeature());
    if (!$("prompt-view").hidden) work.push(showPrompt());
    await Promise.all(work);
    const picked = !$("feature-view").hidden || !$("prompt-view").hidden;
    setStatus(picked || !state.hasSites ? "" : "pick a feature or a prompt");
    document.body.dataset.state = "ready";
  } catch (error) {
    setStatus(error.message, true);
    document.body.dataset.state = "error";
  }
}

async function start() {
  $("token").value = sessionStorage.getItem("circuitscan-token") || "";
  $("token").addEventListener("change", () => {
    sessionStorage.setItem("circuitscan-token", $("token").value);
    start();
  });
  try {
    await loadStores();
    await loadStore();
  } catch (error) {
    setStatus(error.message, true);
    document.body.dataset.state = "error";
    return;
  }
  $("feature").value = state.feature ?? "";
  $("by").value = state.by ?? "";
  $("store").onchange = async () => {
    state.store = $("store").value; state.prompt = null; state.feature = null;
    await loadStore().catch((e) => setStatus(e.message, true)); render();
  };
  $("site").onchange = () => { state.site = $("site").value; render(); };
  $("prompt").onchange = () => { state.prompt = $("prompt").value || null; render(); };
  $("controls").onsubmit = (event) => {
    event.preventDefault();
    state.feature = $("feature").value === "" ? null : $("feature").value;
    state.prompt = $("prompt").value || null;
    state.by = $("by").value.trim() || null;
    render();
  };
  await render();
}

start();
