// codebook_lens feature dashboard: renders the JSON in #cl-data; no network, no libraries.
(function () {
  'use strict';
  const D = JSON.parse(document.getElementById('cl-data').textContent);
  const SVG = 'http://www.w3.org/2000/svg';
  const byFeature = new Map(D.codes.map((c) => [c.feature, c]));
  const $ = (id) => document.getElementById(id);

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function svg(tag, attrs) {
    const e = document.createElementNS(SVG, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    return e;
  }
  // a token's text as shown: newlines, tabs and other control characters made visible
  function visible(s) {
    return s.replace(/\n/g, '\u21b5').replace(/\t/g, '\u21e5').replace(/[\x00-\x1f\x7f]/g,
      (ch) => String.fromCharCode(ch === '\x7f' ? 0x2421 : 0x2400 + ch.charCodeAt(0)));
  }
  function show(id) {
    const s = D.vocab[String(id)];
    return s === undefined ? '#' + id : visible(s);
  }
  function fmtDensity(d) { return d === 0 ? '0' : d.toExponential(2); }
  function fmtVal(v) { return (v >= 0 ? '+' : '') + v.toPrecision(3); }
  function where(c) { return D.site + ' \u00b7 head ' + c.head + ' \u00b7 code ' + c.code; }

  // ---------------------------------------------------------------- header and code list
  $('heading').textContent = D.model + ' \u00b7 ' + D.site;
  $('facts').textContent = D.n_heads + ' head(s) \u00d7 ' + D.n_codes + ' codes, k=' + D.k +
    ', ' + D.similarity + ', combine=' + D.combine + ' \u00b7 ' + D.n_tokens.toLocaleString() +
    ' tokens (' + D.n_seq + ' \u00d7 ' + D.seq_len + ') \u00b7 ' + D.codes.length +
    ' codes shown \u00b7 feature = head \u00d7 ' + D.n_codes + ' + code';

  const hf = $('head-filter');
  hf.appendChild(new Option('all heads', ''));
  for (let h = 0; h < D.n_heads; h++) hf.appendChild(new Option('head ' + h, String(h)));

  const items = D.codes.map((c) => {
    const li = el('li');
    li.dataset.feature = c.feature;
    li.appendChild(el('span', '', '#' + c.feature + ' h' + c.head + '/c' + c.code));
    li.appendChild(el('span', 'd', fmtDensity(c.density)));
    li.addEventListener('click', () => { location.hash = 'f=' + c.feature; });
    const toks = [];
    for (const p of c.top.concat(c.bottom)) toks.push(D.vocab[String(p[0])] || '');
    for (const e of c.examples) for (const i of e.on) toks.push(D.vocab[String(e.tokens[i])] || '');
    li._search = toks.join('\u0000').toLowerCase();
    $('list').appendChild(li);
    return [c, li];
  });

  function matches(c, li, q) {
    let m;
    if (!q) return true;
    if ((m = /^#?(\d+)$/.exec(q))) return c.feature === +m[1] || c.code === +m[1];
    if ((m = /^h(\d+)$/.exec(q))) return c.head === +m[1];
    if ((m = /^c(\d+)$/.exec(q))) return c.code === +m[1];
    if ((m = /^h(\d+)\s*[/ ]?\s*c(\d+)$/.exec(q))) return c.head === +m[1] && c.code === +m[2];
    return li._search.includes(q);
  }
  function filter() {
    const q = $('q').value.trim().toLowerCase();
    const h = hf.value;
    let n = 0;
    for (const [c, li] of items) {
      const ok = (h === '' || c.head === +h) && matches(c, li, q);
      li.hidden = !ok;
      n += ok ? 1 : 0;
    }
    $('shown').textContent = n + ' of ' + D.codes.length + ' codes';
  }
  $('q').addEventListener('input', filter);
  hf.addEventListener('change', filter);

  // ---------------------------------------------------------------- density histogram
  function histogram(c) {
    const edges = D.hist.edges, counts = D.hist.counts[c.head];
    const W = 360, H = 120, L = 30, B = 18, n = counts.length;
    const lo = edges[0], hi = edges[n], bw = (W - L) / n;
    const top = Math.max(1, Math.max.apply(null, counts));
    const s = svg('svg', { class: 'hist', width: W, height: H + B, viewBox: '0 0 ' + W + ' ' + (H + B) });
    const x = (v) => L + (v - lo) / (hi - lo) * (W - L);
    const logd = c.count > 0 ? Math.log10(c.density) : null;
    for (let i = 0; i < n; i++) {
      const h = counts[i] / top * (H - 4);
      const inBin = logd !== null && logd >= edges[i] && (logd < edges[i + 1] || i === n - 1);
      const r = svg('rect', { class: 'bar' + (inBin ? ' cur' : ''), x: L + i * bw + 0.5,
        y: H - h, width: Math.max(bw - 1, 0.5), height: h });
      r.dataset.count = counts[i];
      r.appendChild(svg('title', {})).textContent = counts[i] + ' codes in [' +
        edges[i].toFixed(2) + ', ' + edges[i + 1].toFixed(2) + ')';
      s.appendChild(r);
    }
    s.appendChild(svg('line', { class: 'axis', x1: L, x2: W, y1: H, y2: H }));
    for (let t = Math.ceil(lo); t <= hi; t++) {
      const lab = svg('text', { x: x(t), y: H + 13, 'text-anchor': t === hi ? 'end' : 'middle' });
      lab.textContent = t === 0 ? '1' : '1e' + t;
      s.appendChild(lab);
    }
    const ylab = svg('text', { x: 2, y: 10 });
    ylab.textContent = String(top);
    s.appendChild(ylab);
    if (logd !== null) {
      const m = svg('line', { class: 'marker', x1: x(logd), x2: x(logd), y1: 0, y2: H });
      m.dataset.log10 = logd;
      s.appendChild(m);
    }
    $('hist').replaceChildren(s);
    const dead = D.hist.dead[c.head];
    $('hist-note').textContent = 'log10 firing density of the codes of head ' + c.head +
      ' that fire (' + (D.n_codes - dead) + ' of ' + D.n_codes + '; ' + dead + ' never fire). ' +
      (logd !== null ? 'This code: 10^' + logd.toFixed(2) + ' (red line).' : 'This code never fires.');
  }

  // ---------------------------------------------------------------- logit tables
  function logitTable(rows, kind, label) {
    const t = el('table', 'logits ' + kind);
    const hr = el('tr');
    hr.appendChild(el('th', '', label));
    hr.appendChild(el('th', '', 'effect'));
    t.appendChild(el('thead')).appendChild(hr);
    const body = t.appendChild(el('tbody'));
    const big = Math.max(1e-12, ...rows.map((p) => Math.abs(p[1])));
    for (const [id, v] of rows) {
      const tr = body.appendChild(el('tr'));
      const td = tr.appendChild(el('td', 'tok', show(id)));
      td.title = '#' + id;
      td.style.setProperty('--a', (0.55 * Math.abs(v) / big).toFixed(3));
      tr.appendChild(el('td', 'val', fmtVal(v)));
    }
    return t;
  }
  function logits(c) {
    const box = $('logit-tables');
    if (!D.has_logits) {
      box.replaceChildren();
      $('logit-note').textContent = 'No direct path from ' + D.site + ' to the logits.';
      return;
    }
    box.replaceChildren(logitTable(c.top, 'pos', 'promoted'), logitTable(c.bottom, 'neg', 'suppressed'));
    $('logit-note').textContent = 'Direct logit attribution of the code\u2019s output (final norm scale 1' +
      (D.combine === 'mean' ? ', \u00d71/k' : '') + ').';
  }

  // ---------------------------------------------------------------- top activations
  function examples(c) {
    const box = $('examples');
    box.replaceChildren();
    for (const e of c.examples) {
      const div = box.appendChild(el('div', 'ex'));
      div.dataset.seq = e.seq;
      div.dataset.pos = e.pos;
      div.appendChild(el('span', 'meta', 'seq ' + e.seq + ' pos ' + e.pos + ' slot ' + e.slot));
      const on = new Set(e.on);
      e.tokens.forEach((id, i) => {
        const cls = 't' + (on.has(i) ? ' on' : '') + (i === e.at ? ' at' : '');
        const s = div.appendChild(el('span', cls, show(id)));
        s.title = '#' + id + ' at pos ' + (e.start + i);
      });
    }
    $('act-note').textContent = c.examples.length ? c.examples.length + ' of ' + c.count +
      ' firings (lowest slot first, then dataset order); the code fires on the highlighted ' +
      'tokens, the dark one chose the context.' : 'This code never fires in the store.';
  }

  // ---------------------------------------------------------------- routing
  // scroll the code list (only the list, not the page) so that the selected code shows
  function reveal(li) {
    const box = $('list');
    const top = li.offsetTop, bottom = top + li.offsetHeight;
    if (top < box.scrollTop || bottom > box.scrollTop + box.clientHeight) {
      box.scrollTop = top - box.clientHeight / 2;
    }
  }
  function render(c) {
    const title = $('title');
    title.replaceChildren(el('span', '', 'Feature ' + c.feature), el('span', 'where', where(c)));
    $('stats').replaceChildren();
    const parts = [['fires at ', c.count.toLocaleString() + ' of ' + D.n_tokens.toLocaleString() +
      ' tokens'], ['density ', fmtDensity(c.density)], ['activation ', String(+D.value.toFixed(6))]];
    parts.forEach(([k, v], i) => {
      if (i) $('stats').appendChild(document.createTextNode(' \u00b7 '));
      $('stats').appendChild(document.createTextNode(k));
      $('stats').appendChild(el('b', '', v));
    });
    histogram(c);
    logits(c);
    examples(c);
    for (const [d, li] of items) {
      li.classList.toggle('sel', d === c);
      if (d === c && !li.hidden) reveal(li);
    }
    document.body.dataset.feature = c.feature;
  }
  function route() {
    const m = /f=(\d+)/.exec(location.hash);
    const c = (m && byFeature.get(+m[1])) || D.codes[0];
    if (c) render(c);
    else $('title').textContent = 'No codes to show.';
  }
  window.addEventListener('hashchange', route);
  filter();
  route();
  document.body.dataset.ready = '1';
})();
