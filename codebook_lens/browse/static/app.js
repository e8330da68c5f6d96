// codebook-lens browse: one page, six views, hash routing, no dependencies.
"use strict";

const $view = () => document.getElementById("view");
let VOCAB = null, LABELS = [], KIND = "generic", OVERVIEW = null;

// ------------------------------------------------------------------ helpers
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "text") e.textContent = v;
    else if (k === "style") e.style.cssText = v; // CSSOM: allowed by the page's CSP
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const k of kids.flat(Infinity)) if (k !== null && k !== undefined) e.append(k instanceof Node ? k : String(k));
  return e;
}
const fmt = (x, d = 3) => (x === null || x === undefined ? "–" : Number(x).toFixed(d));
const pct = (x) => (100 * x).toFixed(1) + "%";
const show = (s) => String(s).replace(/\n/g, "↵");

function setError(msg) {
  const e = document.getElementById("error");
  e.hidden = !msg; e.textContent = msg || "";
}

async function api(path, opts) {
  const t0 = performance.now();
  const r = await fetch(path, opts);
  let body;
  try { body = await r.json(); } catch (_) { body = { error: `HTTP ${r.status}` }; }
  document.getElementById("status").textContent = `${path.split("?")[0]} ${(performance.now() - t0).toFixed(0)} ms`;
  if (!r.ok) throw new Error(body.error || `HTTP ${r.status}`);
  return body;
}
const post = (path, data) => api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(data) });

function parseHash() {
  const h = location.hash.replace(/^#\/?/, "");
  const [path, query] = h.split("?");
  return { parts: (path || "overview").split("/").map(decodeURIComponent), params: new URLSearchParams(query || "") };
}
function go(path, params) {
  const q = params ? "?" + new URLSearchParams(params).toString() : "";
  location.hash = "#/" + path + q;
}
const codeHref = (site, head, code) => `#/code/${encodeURIComponent(site)}/${head}/${code}`;
const codeLink = (site, head, code, text) =>
  el("a", { href: codeHref(site, head, code), class: "codelink" }, text ?? `${site} h${head} #${code}`);
const tokText = (id) => (VOCAB && id >= 0 && id < VOCAB.length ? VOCAB[id] : `#${id}`);

function table(header, rows, cls) {
  return el("table", { class: cls || "" },
    el("thead", {}, el("tr", {}, header.map((h) => el("th", { class: h.num ? "num" : "" }, h.t ?? h)))),
    el("tbody", {}, rows));
}
const td = (v, num) => el("td", { class: num ? "num" : "" }, v);
function bars(values, title) {
  const m = Math.max(1, ...values);
  return el("div", { class: "bars", title: title || "" },
    values.map((v, i) => el("div", { style: `height:${(100 * v / m).toFixed(1)}%`, title: `${i}: ${v}` })));
}
const hbar = (frac, bad) => el("span", { class: "hbar" + (bad ? " bad" : ""), style: `width:${Math.max(1, 120 * Math.abs(frac)).toFixed(0)}px` });

function context(ex, linkToken) {
  const line = el("div", { class: "ctx" });
  ex.tokens.forEach((t, j) => {
    if (t === null) return;
    const cls = "tok" + (j === ex.center ? " center" : ex.fires[j] ? " fire" : "");
    line.append(el("span", { class: cls }, show(t)));
  });
  if (linkToken) line.append(" ", el("a", { href: `#/context/${ex.seq}?pos=${ex.pos}`, class: "ctxlink" }, `seq ${ex.seq} pos ${ex.pos}`));
  return line;
}

// ------------------------------------------------------------------ views
async function viewOverview() {
  const o = OVERVIEW = await api("/api/overview");
  const m = o.model;
  const rows = o.sites.map((s) => el("tr", {},
    td(s.site), td(s.per_head ? s.n_heads : "–", true), td(s.n_codes, true), td(s.k, true),
    td(s.used, true), td(pct(s.dead_fraction), true),
    td(el("span", {}, s.histogram.bins.map((b, i) => el("span", { class: "pill", title: "codes used this often" }, `${b}: ${s.histogram.counts[i]}`)))),
    td(el("a", { href: "#/search?" + new URLSearchParams({ kind: "regex", q: ".", site: s.site, by: "count" }) }, "codes"))));
  const metrics = Object.entries(o.metrics || {});
  return [
    el("h2", {}, `Overview of ${o.dir}`),
    el("p", {}, `${o.kind} · ${o.n_seq.toLocaleString()} sequences × ${o.seq_len} tokens = ${o.n_tokens.toLocaleString()} positions · ${o.labels.length} labels`),
    el("h3", {}, "Sites and codebooks"),
    table(["site", { t: "heads", num: 1 }, { t: "codes", num: 1 }, { t: "k", num: 1 }, { t: "used", num: 1 }, { t: "dead", num: 1 }, "usage histogram (firings: codes)", ""], rows, "sites"),
    el("h3", {}, "Model"),
    m.loaded ? el("p", {}, `${m.n_layers} layers, d_model ${m.d_model}, n_ctx ${m.n_ctx}, vocabulary ${m.d_vocab}`)
             : el("p", { class: "muted" }, `no model: ${m.error} (the Lab and logit effects need one)`),
    metrics.length ? [el("h3", {}, "Metrics"), table(["metric", { t: "value", num: 1 }],
      metrics.map(([k, v]) => el("tr", {}, td(k), td(Number.isInteger(v) ? v : fmt(v, 4), true))))] : null,
  ];
}

function searchForm(p) {
  const sites = (OVERVIEW ? OVERVIEW.sites : []).map((s) => s.site);
  const inp = (name, attrs) => el("input", { name, value: p.get(name) ?? attrs.value ?? "", ...attrs });
  const sel = (name, opts, dflt) => el("select", { name }, opts.map((o) => el("option", { value: o, selected: (p.get(name) ?? dflt) === o }, o || "all")));
  const form = el("form", { class: "bar", id: "search-form", onsubmit: (e) => {
    e.preventDefault();
    const fd = new FormData(form); const q = {};
    for (const [k, v] of fd.entries()) if (v !== "") q[k] = v;
    go("search", q);
  } },
    el("label", {}, "search by", sel("kind", ["regex", "token", "label"], "regex")),
    el("label", {}, "query (regex: capture group (…) marks tokens)", inp("q", { size: 30, placeholder: KIND === "fsm" ? "e.g. 1(2)" : "e.g.  (the)", id: "search-q" })),
    el("label", {}, "match marks", sel("mode", ["overlap", "start", "end"], "overlap")),
    el("label", {}, "rank by", sel("by", ["f1", "precision", "recall", "count", "tp"], "f1")),
    el("label", {}, "order", sel("order", ["desc", "asc"], "desc")),
    el("label", {}, "min precision", inp("min_precision", { type: "number", step: "0.05", min: 0, max: 1, value: "0" })),
    el("label", {}, "min recall", inp("min_recall", { type: "number", step: "0.05", min: 0, max: 1, value: "0" })),
    el("label", {}, "min count", inp("min_count", { type: "number", min: 0, value: "1" })),
    el("label", {}, "site", sel("site", ["", ...sites], "")),
    el("label", {}, "per page", inp("limit", { type: "number", min: 1, max: 500, value: "25" })),
    el("button", { type: "submit", id: "search-go" }, "Search"));
  return form;
}

async function viewSearch(p) {
  if (!OVERVIEW) OVERVIEW = await api("/api/overview");
  const out = [el("h2", {}, "Search codes"), searchForm(p)];
  if (LABELS.length) out.push(el("p", { class: "muted" }, `labels: ${LABELS.slice(0, 30).join(", ")}${LABELS.length > 30 ? " …" : ""}`));
  if (!p.get("q")) { out.push(el("p", { class: "muted" }, "Type a regex, a token text (or #id), or a label, and press Search.")); return out; }
  const q = new URLSearchParams(p); if (!q.get("limit")) q.set("limit", "25");
  const r = await api("/api/search?" + q.toString());
  const rows = r.items.map((it, i) => el("tr", {},
    td(r.offset + i + 1, true), td(codeLink(it.site, it.head, it.code)), td(fmt(it.precision), true),
    td(fmt(it.recall), true), td(fmt(it.f1), true), td(it.count, true), td(it.tp, true)));
  const off = r.offset, lim = r.limit;
  const page = (o) => { const n = new URLSearchParams(p); n.set("offset", Math.max(0, o)); return "#/search?" + n.toString(); };
  out.push(el("p", {}, `${r.total.toLocaleString()} codes match · the feature holds at ${r.n_feature.toLocaleString()} positions`),
    table([{ t: "#", num: 1 }, "code", { t: "precision", num: 1 }, { t: "recall", num: 1 }, { t: "F1", num: 1 }, { t: "count", num: 1 }, { t: "true pos.", num: 1 }], rows, "results"),
    el("div", { class: "pager" },
      off > 0 ? el("a", { href: page(off - lim) }, "← previous") : null,
      el("span", { class: "muted" }, `${r.total ? off + 1 : 0}–${Math.min(off + lim, r.total)} of ${r.total}`),
      off + lim < r.total ? el("a", { href: page(off + lim), id: "next-page" }, "next →") : null));
  return out;
}

async function viewCode(parts, p) {
  if (parts.length < 4) {
    const f = el("form", { class: "bar", onsubmit: (e) => { e.preventDefault(); const d = new FormData(f); go(`code/${encodeURIComponent(d.get("site"))}/${d.get("head")}/${d.get("code")}`); } },
      el("label", {}, "site", el("input", { name: "site", size: 28, value: OVERVIEW ? OVERVIEW.sites[0].site : "" })),
      el("label", {}, "head", el("input", { name: "head", type: "number", value: 0 })),
      el("label", {}, "code", el("input", { name: "code", type: "number", value: 0 })),
      el("button", {}, "Open"));
    return [el("h2", {}, "Code page"), el("p", { class: "muted" }, "Open a code from Search, or by id:"), f];
  }
  const [site, head, code] = [parts[1], +parts[2], +parts[3]];
  const seed = +(p.get("seed") || 0);
  const c = await api(`/api/code/${encodeURIComponent(site)}/${head}/${code}?seed=${seed}`);
  const note = el("input", { size: 40, placeholder: "note, e.g. 'fires on state 12'", id: "bm-note" });
  const bm = el("button", { class: "secondary", id: "bm-add", onclick: async () => {
    await post("/api/bookmarks", { site, head, code, note: note.value }); bm.textContent = "Bookmarked ✓"; } }, "Bookmark");
  const ivs = JSON.stringify([{ site, head: c.n_heads > 1 ? head : null, action: "force", code, positions: [-1] }]);
  const effects = el("div", { class: "grid", id: "effects" }, el("p", { class: "muted" }, "loading logit effect…"));
  const out = [
    el("h2", {}, `${site} · head ${head} · code ${code}`),
    el("p", {}, `fires at ${c.count.toLocaleString()} of ${c.n_tokens.toLocaleString()} positions (${pct(c.frequency)}) · `,
      el("a", { href: "#/lab?" + new URLSearchParams({ iv: ivs }), id: "to-lab" }, "force it in the Lab"), " · ", note, " ", bm),
    el("h3", {}, "Firings by position in the sequence"), bars(c.by_position, "firings per position"),
    el("div", { class: "grid" },
      el("div", {}, el("h3", {}, "Top contexts (lowest slot first)"), c.top.map((e) => context(e, true)),
        c.top.length ? null : el("p", { class: "muted" }, "this code never fires")),
      el("div", {}, el("h3", {}, "Random sample of firings ", el("a", { href: codeHref(site, head, code) + `?seed=${seed + 1}` }, "(resample)")),
        c.random.map((e) => context(e, true)))),
    el("div", { class: "grid" },
      el("div", {}, el("h3", {}, "Tokens it fires on"), table(["token", { t: "count", num: 1 }, { t: "share", num: 1 }],
        c.tokens.map((t) => el("tr", {}, td(el("span", { class: "tok" }, show(t.text))), td(t.count, true), td(pct(t.count / Math.max(1, c.count)), true))), "tokens")),
      el("div", {}, el("h3", {}, "Labels it detects"), c.labels.length ? table(["label", { t: "precision", num: 1 }, { t: "recall", num: 1 }, { t: "F1", num: 1 }, { t: "true pos.", num: 1 }],
        c.labels.map((l) => el("tr", {}, td(el("a", { href: "#/search?" + new URLSearchParams({ kind: "label", q: l.name }) }, l.name)), td(fmt(l.precision), true), td(fmt(l.recall), true), td(fmt(l.f1), true), td(l.tp, true))), "labels")
        : el("p", { class: "muted" }, LABELS.length ? "no labelled firings" : "this store has no labels"))),
    effects,
  ];
  api(`/api/code/${encodeURIComponent(site)}/${head}/${code}/effects`).then((e) => {
    effects.replaceChildren();
    const lg = e.logits;
    const lt = (rows, bad) => table(["token", { t: "logit effect", num: 1 }, ""], rows.map((r) => el("tr", {}, td(el("span", { class: "tok" }, show(tokText(r.id)))), td(fmt(r.value, 4), true), td(hbar(r.value / Math.max(1e-9, Math.abs(lg.top[0].value), Math.abs(lg.bottom[0].value)), bad)))));
    effects.append(lg.available ? el("div", {}, el("h3", {}, "Direct logit effect: top"), lt(lg.top)) : el("div", {}, el("h3", {}, "Direct logit effect"), el("p", { class: "muted" }, lg.reason)),
      lg.available ? el("div", {}, el("h3", {}, "Direct logit effect: bottom"), lt(lg.bottom, true)) : null,
      el("div", {}, el("h3", {}, "Nearest codes (cosine, same codebook)"), e.nearest.length ? table(["code", { t: "cosine", num: 1 }, { t: "count", num: 1 }],
        e.nearest.map((n) => el("tr", {}, td(codeLink(site, head, n.code, `#${n.code}`)), td(fmt(n.cosine), true), td(n.count, true))), "nearest") : el("p", { class: "muted" }, "needs the model")));
  }).catch((err) => { effects.replaceChildren(el("p", { class: "muted" }, err.message)); });
  return out;
}

async function viewContext(parts, p) {
  if (parts.length < 2) {
    const f = el("form", { class: "bar", onsubmit: (e) => { e.preventDefault(); go(`context/${new FormData(f).get("seq")}`); } },
      el("label", {}, "sequence", el("input", { name: "seq", type: "number", value: 0, min: 0 })), el("button", {}, "Show"));
    return [el("h2", {}, "Token view"), el("p", { class: "muted" }, "Open a context from a code page, or by sequence index:"), f];
  }
  const seq = +parts[1], pos = p.has("pos") ? +p.get("pos") : -1;
  const c = await api(`/api/context/${seq}`);
  const head = el("tr", {}, el("th", { class: "num" }, "pos"), el("th", {}, "token"), c.labels ? el("th", {}, "label") : null,
    c.columns.map((col) => el("th", { title: col.site }, `${col.site.replace("blocks.", "L").replace(".attn.hook_z", " attn").replace(".hook_mlp_out", " mlp")}${col.codes[0] && c.columns.filter((x) => x.site === col.site).length > 1 ? " h" + col.head : ""}`)));
  const rows = c.tokens.map((t, i) => el("tr", { class: i === pos ? "sel" : "", id: `pos-${i}` },
    td(i, true), td(el("span", { class: "tok" }, show(t))), c.labels ? td(c.labels[i] ?? "") : null,
    c.columns.map((col) => el("td", {}, col.codes[i].filter((x) => x >= 0).map((x, j) => [j ? " " : "", codeLink(col.site, col.head, x, String(x))])))));
  return [el("h2", {}, `Token view · sequence ${seq}${pos >= 0 ? ` · position ${pos}` : ""}`),
    el("p", { class: "ctx" }, c.tokens.map((t, i) => el("span", { class: "tok" + (i === pos ? " center" : "") }, show(t)))),
    el("p", { class: "muted" }, "Each cell lists the codes active at that position, site and head; click one to open its page."),
    el("table", { class: "codes" }, el("thead", {}, head), el("tbody", {}, rows))];
}

function ivRow(iv, sites) {
  const row = el("div", { class: "ivrow" });
  row.append(
    el("select", { name: "action" }, ["force", "ablate"].map((a) => el("option", { value: a, selected: iv.action === a }, a))),
    "code", el("input", { name: "code", type: "number", min: 0, value: iv.code ?? "", placeholder: "all" }),
    "at", el("select", { name: "site" }, sites.map((s) => el("option", { value: s, selected: iv.site === s }, s))),
    "head", el("input", { name: "head", type: "number", min: 0, value: iv.head ?? "", placeholder: "all" }),
    "positions", el("input", { name: "positions", size: 10, value: iv.positions ? iv.positions.join(",") : "", placeholder: "all (e.g. -1,3)" }),
    el("button", { type: "button", class: "secondary", onclick: () => row.remove() }, "×"));
  return row;
}
function readIvs(box) {
  return [...box.querySelectorAll(".ivrow")].map((r) => {
    const v = (n) => r.querySelector(`[name=${n}]`).value.trim();
    return { action: v("action"), site: v("site"), code: v("code") === "" ? null : +v("code"), head: v("head") === "" ? null : +v("head"),
      positions: v("positions") === "" ? null : v("positions").split(/[ ,]+/).filter(Boolean).map(Number) };
  });
}

function labSide(title, side, base, texts) {
  const nx = side.next;
  const nrows = nx.items.map((it, i) => {
    const b = base.next.items.find((x) => x.id === it.id);
    return el("tr", {}, td(el("span", { class: "tok" + (it.valid === false ? " invalid" : it.valid ? " valid" : "") }, nx.kind === "state" ? it.text : show(tokText(it.id)))),
      td(fmt(it.prob), true), td(hbar(it.prob)), b && side !== base ? td(fmt(it.prob - b.prob), true) : null);
  });
  let cont = side.continuation.map((id) => tokText(id)).join("");
  if (nx.kind === "state" && nx.items.length) { // TokFSM: one group of digits per state
    const nd = nx.items[0].text.length;
    cont = cont.replace(new RegExp(`(\\d{${nd}})`, "g"), "$1 ").trim();
  }
  return el("div", { class: "card lab-side", id: `lab-${title.toLowerCase()}` }, el("h3", {}, title),
    el("div", {}, nx.kind === "state" ? `next-state distribution (last state ${nx.last_state ?? "–"}; successors in green)` : "next-token distribution"),
    table(["next", { t: "prob", num: 1 }, "", side !== base ? { t: "Δ vs unpatched", num: 1 } : null].filter(Boolean), nrows, "next"),
    el("div", {}, "sampled continuation:"), el("div", { class: "ctx continuation" }, show(cont) || "(none)"));
}

function codesTable(res) {
  const sites = Object.keys(res.unpatched.codes);
  const cols = []; for (const s of sites) res.unpatched.codes[s][0].forEach((_, h) => cols.push([s, h]));
  const head = el("tr", {}, el("th", { class: "num" }, "pos"), el("th", {}, "token"), cols.map(([s, h]) => el("th", { title: s }, s.replace("blocks.", "L").replace(".attn.hook_z", " attn").replace(".hook_mlp_out", " mlp") + (res.unpatched.codes[s][0].length > 1 ? " h" + h : ""))));
  const rows = res.texts.map((t, i) => el("tr", {}, td(i, true), td(el("span", { class: "tok" }, show(t))), cols.map(([s, h]) => {
    const a = res.unpatched.codes[s][i][h].filter((x) => x >= 0), b = res.patched.codes[s][i][h].filter((x) => x >= 0);
    const same = a.join() === b.join();
    return el("td", { class: same ? "" : "changed", title: same ? "" : `unpatched: ${a.join(" ")}` },
      b.map((x, j) => [j ? " " : "", codeLink(s, h, x, String(x))]), b.length ? null : "∅");
  })));
  return el("table", { class: "codes", id: "lab-codes" }, el("thead", {}, head), el("tbody", {}, rows));
}

async function viewLab(p) {
  if (!OVERVIEW) OVERVIEW = await api("/api/overview");
  const sites = OVERVIEW.sites.map((s) => s.site);
  const dflt = KIND === "fsm" ? "" : KIND === "lm" ? "Once upon a time" : "1 2 3 4";
  const prompt = el("textarea", { id: "lab-prompt", placeholder: KIND === "fsm" ? "digits, e.g. 12 07 33 (BOS is added)" : "" });
  prompt.value = p.get("prompt") ?? (sessionStorage.getItem("lab-prompt") || dflt);
  const box = el("div", { id: "lab-ivs" });
  let ivs = []; try { ivs = JSON.parse(p.get("iv") || "[]"); } catch (_) { ivs = []; }
  ivs.forEach((iv) => box.append(ivRow(iv, sites)));
  const nNew = el("input", { type: "number", id: "lab-nnew", min: 0, max: 64, value: p.get("n_new") || 16 });
  const seed = el("input", { type: "number", id: "lab-seed", value: p.get("seed") || 0 });
  const result = el("div", { id: "lab-result" });
  const run = async () => {
    setError("");
    sessionStorage.setItem("lab-prompt", prompt.value);
    try {
      const res = await post("/api/lab", { prompt: prompt.value, interventions: readIvs(box), n_new: +nNew.value, seed: +seed.value });
      result.replaceChildren(el("div", { class: "grid" }, labSide("Unpatched", res.unpatched, res.unpatched), labSide("Patched", res.patched, res.unpatched)),
        el("h3", {}, "Codes per position (patched; changed cells in blue, hover for the unpatched codes)"), codesTable(res));
    } catch (err) { setError(err.message); }
  };
  const out = [el("h2", {}, "Lab: intervene on codes"),
    el("label", {}, KIND === "fsm" ? "Prompt (TokFSM digits)" : "Prompt"), prompt,
    el("h3", {}, "Interventions"), box,
    el("div", { class: "ivrow" }, el("button", { type: "button", class: "secondary", id: "lab-add", onclick: () => box.append(ivRow({ action: "force", site: sites[0], positions: [-1] }, sites)) }, "+ intervention"),
      "new tokens", nNew, "seed", seed, el("button", { id: "lab-run", onclick: run }, "Run")),
    result];
  if (p.get("run") === "1" || (prompt.value && ivs.length)) setTimeout(run, 0);
  return out;
}

async function viewBookmarks() {
  const b = (await api("/api/bookmarks")).bookmarks;
  const rows = b.map((x) => el("tr", {}, td(x.id, true), td(codeLink(x.site, x.head, x.code)), td(x.note), td(x.created),
    td(el("button", { class: "secondary", onclick: async () => { await api(`/api/bookmarks/${x.id}`, { method: "DELETE" }); route(); } }, "delete"))));
  return [el("h2", {}, "Bookmarks"), el("p", { class: "muted" }, "Saved codes with notes (a demo-codes list), kept in DIR/bookmarks.json."),
    b.length ? table([{ t: "id", num: 1 }, "code", "note", "saved", ""], rows, "bookmarks") : el("p", { id: "no-bookmarks" }, "No bookmarks yet: open a code page and press Bookmark.")];
}

// ------------------------------------------------------------------ router
async function route() {
  const { parts, params } = parseHash();
  const view = parts[0];
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.view === view));
  setError("");
  const v = $view();
  v.dataset.view = view; v.dataset.ready = "0";
  try {
    if (!VOCAB) { const t = await api("/api/tokens"); VOCAB = t.vocab; LABELS = t.labels; KIND = t.kind; }
    const body = view === "search" ? await viewSearch(params)
      : view === "code" ? await viewCode(parts, params)
      : view === "context" ? await viewContext(parts, params)
      : view === "lab" ? await viewLab(params)
      : view === "bookmarks" ? await viewBookmarks()
      : await viewOverview();
    v.replaceChildren(...[body].flat(Infinity).filter((x) => x !== null && x !== undefined));
  } catch (err) {
    setError(err.message);
    v.replaceChildren(el("p", { class: "muted" }, "Could not load this view."));
  }
  v.dataset.ready = "1";
}
window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", route);
