// The portcullis traffic page. Polls api/summary and api/denied and redraws
// in place (no reloads). Every name and every piece of TOML is inserted with
// textContent or as an attribute value, never as HTML: names come from
// clients (SNI, Host) and from the config.
'use strict';

(function () {
  const POLL_MS = 2000;
  const GRAPH_NODES = 12; // entries drawn in the graph, by flows
  const ENTRY_ROWS = 100; // entry table rows (the filter finds the others)
  const NAME_ROWS = 50; // denied/audited names asked for
  const DECISIONS = ['allow', 'deny', 'audit', 'passthrough'];
  const SVGNS = 'http://www.w3.org/2000/svg';

  const $ = (id) => document.getElementById(id);
  let updates = 0;
  let summary = null;
  let lastEntriesSig = '';
  let lastDeniedSig = '';
  const openToml = new Set();

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function svg(tag, attrs, text) {
    const e = document.createElementNS(SVGNS, tag);
    for (const k in attrs || {}) e.setAttribute(k, String(attrs[k]));
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function num(n) {
    return Number(n || 0).toLocaleString('en-US');
  }

  function bytes(n) {
    n = Number(n || 0);
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) {
      n /= 1024;
      i++;
    }
    return (i === 0 ? String(n) : n.toFixed(n >= 100 ? 0 : 1)) + ' ' + units[i];
  }

  function short(s, max) {
    s = String(s);
    return s.length > max ? s.slice(0, max - 1) + '…' : s;
  }

  function ago(ts) {
    if (!ts) return '-';
    const t = Date.parse(ts);
    if (isNaN(t)) return ts;
    const s = Math.max(0, Math.round((Date.now() - t) / 1000));
    if (s < 60) return s + ' s ago';
    if (s < 3600) return Math.round(s / 60) + ' min ago';
    if (s < 86400) return Math.round(s / 3600) + ' h ago';
    return new Date(t).toISOString().slice(0, 19).replace('T', ' ');
  }

  function kv(obj) {
    const parts = [];
    for (const k of Object.keys(obj || {})) {
      if (obj[k]) parts.push(k + ' ' + num(obj[k]));
    }
    return parts.length ? parts.join(', ') : '-';
  }

  async function getJSON(url) {
    const r = await fetch(url, { cache: 'no-store', credentials: 'same-origin' });
    if (!r.ok) throw new Error(url + ' answered ' + r.status);
    return r.json();
  }

  // ---------------------------------------------------------------- header

  function renderState(s) {
    $('policy').textContent = s.policy;
    $('audit').textContent = s.audit ? 'on' : 'off';
    const reload = $('reload');
    let text = s.reload_ok ? 'loaded' : 'last reload FAILED';
    if (s.reload && s.reload.last_reload) text += ' (reload ' + ago(s.reload.last_reload) + ')';
    if (!s.reload_ok && s.reload && s.reload.last_error) text += ': ' + s.reload.last_error;
    if (s.reload && s.reload.restart_required && s.reload.restart_required.length) {
      text += '; restart required for ' + s.reload.restart_required.join(', ');
    }
    if (s.reload && s.reload.rerun_init) text += '; re-run init';
    reload.textContent = text;
    reload.title = s.config_path;
    reload.classList.toggle('bad', !s.reload_ok || (s.reload && s.reload.rerun_init));
    const ready = $('ready');
    ready.textContent = s.draining ? 'draining' : s.ready ? 'ready' : 'starting';
    ready.classList.toggle('bad', !s.ready);
    $('active').textContent = num(s.active) + ' / ' + num(s.max_connections);
    for (const d of DECISIONS) $('t-' + d).textContent = num(s.totals.flows[d]);
    $('t-bytes').textContent = bytes(s.totals.bytes_up) + ' / ' + bytes(s.totals.bytes_down);
  }

  // ---------------------------------------------------------------- graph

  function renderGraph(s) {
    const g = $('graph');
    const entries = s.entries.filter((e) => e.kind !== 'blackhole' && e.kind !== 'passthrough');
    const busy = entries.filter((e) => e.flows_total > 0).sort((a, b) => b.flows_total - a.flows_total);
    const shown = busy.slice(0, GRAPH_NODES);
    const rest = busy.slice(GRAPH_NODES);
    const nodes = shown.map((e) => ({ e: e, label: e.name, cls: 'entry' }));
    if (rest.length) {
      const agg = { name: rest.length + ' more entries', flows: {}, flows_total: 0, bytes_up: 0, bytes_down: 0 };
      for (const e of rest) {
        agg.flows_total += e.flows_total;
        agg.bytes_up += e.bytes_up;
        agg.bytes_down += e.bytes_down;
        for (const d of DECISIONS) agg.flows[d] = (agg.flows[d] || 0) + (e.flows[d] || 0);
      }
      nodes.push({ e: agg, label: agg.name, cls: 'entry more' });
    }
    for (const kind of ['blackhole', 'passthrough']) {
      const e = s.entries.find((x) => x.kind === kind);
      if (e) nodes.push({ e: e, label: e.name, cls: kind });
    }
    const idle = entries.length - busy.length;
    $('graph-note').textContent =
      (idle ? idle + (idle === 1 ? ' entry' : ' entries') + ' without flows not drawn. ' : '') +
      (rest.length ? 'The ' + rest.length + ' least busy entries are drawn as one node; the table lists them all.' : '');

    const rowH = 46;
    const width = 980;
    const height = Math.max(160, nodes.length * rowH + 30);
    const wx = 20, ww = 150, nx = 560, nw = 400;
    g.setAttribute('viewBox', '0 0 ' + width + ' ' + height);
    g.setAttribute('width', String(width));
    g.setAttribute('height', String(height));
    const parts = [];
    const max = Math.max(1, ...nodes.map((n) => n.e.flows_total || 0));
    const wy = height / 2;
    nodes.forEach((n, i) => {
      const y = 20 + i * rowH + rowH / 2;
      // one edge per decision present, side by side
      const present = DECISIONS.filter((d) => (n.e.flows[d] || 0) > 0);
      present.forEach((d, j) => {
        const f = n.e.flows[d];
        const w = 1.5 + 12 * Math.log(1 + f) / Math.log(1 + max);
        const off = (j - (present.length - 1) / 2) * 6;
        const x1 = wx + ww, y1 = wy + off / 2, x2 = nx, y2 = y + off;
        const path = svg('path', {
          class: 'edge ' + d,
          d: 'M' + x1 + ',' + y1 + ' C' + (x1 + 160) + ',' + y1 + ' ' + (x2 - 160) + ',' + y2 + ' ' + x2 + ',' + y2,
          'stroke-width': w.toFixed(1),
        });
        path.appendChild(svg('title', {}, n.label + ': ' + num(f) + ' ' + d));
        parts.push(path);
      });
      const node = svg('g', { class: 'node ' + n.cls, transform: 'translate(' + nx + ',' + (y - 18) + ')' });
      if (n.e.name) node.setAttribute('data-node', n.e.name);
      node.appendChild(svg('rect', { width: nw, height: 36, rx: 5 }));
      node.appendChild(svg('text', { x: 10, y: 15 }, short(n.label, 58)));
      node.appendChild(
        svg('text', { x: 10, y: 30, class: 'stats' },
          num(n.e.flows_total) + (n.e.flows_total === 1 ? ' flow' : ' flows') +
            (n.e.flows_total ? ' (' + kv(n.e.flows) + ')' : '') +
            ' · ↑ ' + bytes(n.e.bytes_up) + ' ↓ ' + bytes(n.e.bytes_down)),
      );
      node.appendChild(svg('title', {}, n.label));
      parts.push(node);
    });
    const w = svg('g', { class: 'node workload', transform: 'translate(' + wx + ',' + (wy - 20) + ')' });
    w.appendChild(svg('rect', { width: ww, height: 40, rx: 6 }));
    w.appendChild(svg('text', { x: 12, y: 25 }, 'workload'));
    parts.push(w);
    g.replaceChildren(...parts);
  }

  function renderTrend(s) {
    const g = $('trend');
    const series = s.series.by_decision;
    const len = Math.max(0, ...DECISIONS.map((d) => (series[d] || []).length));
    const width = 980, height = 120, slots = 180;
    const bw = width / slots;
    g.setAttribute('viewBox', '0 0 ' + width + ' ' + (height + 16));
    g.setAttribute('width', String(width));
    g.setAttribute('height', String(height + 16));
    let max = 1;
    for (let i = 0; i < len; i++) {
      let sum = 0;
      for (const d of DECISIONS) sum += (series[d] || [])[i] || 0;
      max = Math.max(max, sum);
    }
    const parts = [svg('line', { class: 'axis', x1: 0, y1: height, x2: width, y2: height })];
    for (let i = 0; i < len; i++) {
      const x = (slots - len + i) * bw;
      let y = height;
      for (const d of DECISIONS) {
        const v = (series[d] || [])[i] || 0;
        if (!v) continue;
        const h = (v / max) * (height - 4);
        y -= h;
        const r = svg('rect', { class: 'bar ' + d, x: x.toFixed(1), y: y.toFixed(1), width: Math.max(1, bw - 1).toFixed(1), height: h.toFixed(1) });
        r.appendChild(svg('title', {}, num(v) + ' ' + d));
        parts.push(r);
      }
    }
    parts.push(svg('text', { x: 0, y: height + 14, class: 'stats' }, '15 min ago'));
    parts.push(svg('text', { x: width - 30, y: height + 14, class: 'stats' }, 'now'));
    parts.push(svg('text', { x: width - 150, y: 12, class: 'stats' }, 'peak ' + num(max) + ' per ' + s.series.interval_s + ' s'));
    g.replaceChildren(...parts);
  }

  function spark(values) {
    const w = 90, h = 22;
    const s = svg('svg', { width: w, height: h, viewBox: '0 0 ' + w + ' ' + h });
    const max = Math.max(1, ...values);
    const n = Math.max(2, values.length);
    const pts = values.map((v, i) => (i * (w / (n - 1))).toFixed(1) + ',' + (h - 2 - (v / max) * (h - 4)).toFixed(1));
    if (pts.length) s.appendChild(svg('polyline', { class: 'spark', points: pts.join(' ') }));
    return s;
  }

  // ---------------------------------------------------------------- tables

  function cell(tr, cls, text) {
    const td = el('td', cls, text);
    tr.appendChild(td);
    return td;
  }

  function numCell(tr, cls, n) {
    return cell(tr, 'num ' + cls + (n ? '' : ' zero'), num(n));
  }

  function entryText(e) {
    return [e.name, ...e.hosts, ...e.addresses, ...e.ports.map((p) => p.number + '/' + p.protocol)].join(' ').toLowerCase();
  }

  function renderEntries(s) {
    const q = $('entry-filter').value.trim().toLowerCase();
    const all = s.entries.slice().sort((a, b) => b.flows_total - a.flows_total || a.name.localeCompare(b.name));
    const matched = q ? all.filter((e) => entryText(e).includes(q)) : all;
    const rows = matched.slice(0, ENTRY_ROWS);
    $('entry-count').textContent =
      'showing ' + rows.length + ' of ' + matched.length + (q ? ' matching' : '') + ' (' + s.entries.length + ' in all)';
    const sig = JSON.stringify([q, rows.map((e) => [e.name, e.flows, e.bytes_up, e.bytes_down, e.last_seen, e.trend, e.denials])]);
    if (sig === lastEntriesSig) return;
    lastEntriesSig = sig;
    const body = $('entries').tBodies[0];
    const trs = rows.map((e) => {
      const tr = el('tr', 'entry-row');
      tr.dataset.entry = e.name;
      const name = cell(tr, 'name', e.name);
      if (e.kind !== 'entry') name.appendChild(el('span', 'badge ' + e.kind, e.kind === 'blackhole' ? 'denied' : e.kind === 'removed' ? 'removed' : 'no entry'));
      const hosts = e.hosts.concat(e.addresses);
      cell(tr, 'list', hosts.length ? hosts.join(', ') : '-');
      cell(tr, 'list', e.ports.length ? e.ports.map((p) => p.number + '/' + p.protocol).join(', ') : '-');
      numCell(tr, 'flows', e.flows_total);
      for (const d of DECISIONS) numCell(tr, d, e.flows[d]);
      numCell(tr, 'bytes-up', e.bytes_up).title = num(e.bytes_up) + ' bytes';
      tr.lastChild.textContent = bytes(e.bytes_up);
      numCell(tr, 'bytes-down', e.bytes_down).title = num(e.bytes_down) + ' bytes';
      tr.lastChild.textContent = bytes(e.bytes_down);
      cell(tr, 'denials', kv(e.denials));
      const seen = cell(tr, 'seen', ago(e.last_seen));
      if (e.last_seen) seen.title = e.last_seen;
      const t = cell(tr, 'trend');
      t.appendChild(spark(e.trend || []));
      return tr;
    });
    body.replaceChildren(...trs);
  }

  function copy(text, button) {
    const done = () => {
      button.textContent = 'copied';
      setTimeout(() => (button.textContent = 'copy'), 1500);
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, () => select(button));
    } else {
      select(button);
    }
  }

  function select(button) {
    const pre = button.parentNode.querySelector('pre');
    const range = document.createRange();
    range.selectNodeContents(pre);
    const sel = window.getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
    button.textContent = 'selected: press Ctrl+C';
  }

  function renderDenied(d) {
    $('denied-count').textContent =
      'showing ' + d.names.length + ' of ' + d.matched + ' matching names (' + d.names_total + ' names in ' + num(d.held) + ' records held, at most ' + num(d.max) + ')';
    const sig = JSON.stringify(d.names.map((n) => [n.name, n.count, n.last_seen, n.toml]));
    if (sig === lastDeniedSig) return;
    lastDeniedSig = sig;
    const body = $('denied').tBodies[0];
    const trs = d.names.map((n) => {
      const tr = el('tr', 'denied-row');
      tr.dataset.name = n.name;
      cell(tr, 'name', n.name);
      numCell(tr, 'count', n.count);
      numCell(tr, 'deny', n.decisions.deny);
      numCell(tr, 'audit', n.decisions.audit);
      cell(tr, 'list', kv(n.reasons));
      cell(tr, 'list', n.ports.join(', '));
      const seen = cell(tr, 'seen', ago(n.last_seen));
      seen.title = n.last_seen;
      const td = cell(tr, 'toml-cell');
      if (n.toml) {
        const det = el('details');
        det.open = openToml.has(n.name);
        det.addEventListener('toggle', () => (det.open ? openToml.add(n.name) : openToml.delete(n.name)));
        det.appendChild(el('summary', null, 'service entry'));
        det.appendChild(el('pre', 'toml', n.toml));
        const b = el('button', 'copy', 'copy');
        b.type = 'button';
        b.addEventListener('click', () => copy(n.toml, b));
        det.appendChild(b);
        td.appendChild(det);
      } else {
        td.textContent = 'allowed by the registry now';
        td.className = 'hint';
      }
      return tr;
    });
    body.replaceChildren(...trs);
  }

  // ---------------------------------------------------------------- loop

  let timer = null;
  let inflight = false;

  async function refresh() {
    if (inflight) return;
    inflight = true;
    clearTimeout(timer);
    try {
      const q = $('denied-filter').value.trim();
      const url =
        'api/denied?limit=' + NAME_ROWS + '&sort=' + encodeURIComponent($('denied-sort').value) + (q ? '&q=' + encodeURIComponent(q) : '');
      const [s, d] = await Promise.all([getJSON('api/summary'), getJSON(url)]);
      summary = s;
      renderState(s);
      renderGraph(s);
      renderTrend(s);
      renderEntries(s);
      renderDenied(d);
      updates++;
      document.body.dataset.updates = String(updates);
      const u = $('updated');
      u.textContent = 'live · updated ' + new Date().toLocaleTimeString();
      u.classList.remove('stale');
    } catch (e) {
      const u = $('updated');
      u.textContent = 'cannot reach the proxy (' + e.message + '); retrying';
      u.classList.add('stale');
    } finally {
      inflight = false;
      timer = setTimeout(refresh, POLL_MS);
    }
  }

  function soon() {
    clearTimeout(timer);
    timer = setTimeout(refresh, 250);
  }

  document.addEventListener('DOMContentLoaded', () => {
    $('entry-filter').addEventListener('input', () => summary && renderEntries(summary));
    $('denied-filter').addEventListener('input', soon);
    $('denied-sort').addEventListener('change', soon);
    refresh();
  });
})();
