// accord dashboard: renders the snapshots the server sends (/api/events), no external code.
"use strict";
const PALETTE = ["#2f6fdf", "#1e9e55", "#a34fd0", "#e0682b", "#0f9aa8", "#c23d7a", "#6d8a12",
                 "#8a5a2b"];
const colors = {};
const $ = (id) => document.getElementById(id);

function el(tag, text, attrs) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}
function fmt(v, unit) { return v === null || v === undefined ? "–" : unit ? v + " " + unit : v; }
function clock(t) { return t ? new Date(t * 1000).toLocaleTimeString() : "–"; }
function color(node) {
  if (!(node in colors)) colors[node] = PALETTE[Object.keys(colors).length % PALETTE.length];
  return colors[node];
}
const drawn = {};
function rows(tbodyOf, items, make) {
  // Redraw a table only when its data changed: a button being clicked stays the same element.
  const key = JSON.stringify(items);
  if (drawn[tbodyOf] === key) return;
  drawn[tbodyOf] = key;
  const body = $(tbodyOf).querySelector("tbody");
  body.replaceChildren(...items.map(make));
  if (!items.length) {
    const cols = $(tbodyOf).querySelectorAll("th").length;
    const tr = el("tr"); tr.appendChild(el("td", "none", {colspan: cols, class: "muted"}));
    body.appendChild(tr);
  }
}
function tr(cells, attrs) {
  const r = el("tr", null, attrs);
  for (const c of cells) r.appendChild(c instanceof Node ? c : el("td", fmt(c)));
  return r;
}
function badge(state) {
  const td = el("td"); td.appendChild(el("span", state, {class: "badge state-" + state}));
  return td;
}

function nodeName(n) {
  const td = el("td", n.metrics_url ? null : n.name);
  if (n.metrics_url) td.appendChild(el("a", n.name, {href: n.metrics_url, title: "metrics"}));
  if (!n.reachable && n.state !== "dead" && n.state !== "left")
    td.appendChild(el("small", " (not answering)"));
  return td;
}
function renderNodes(s) {
  rows("nodes", s.nodes, (n) => tr([
    nodeName(n), badge(n.state), n.shards, n.activations, n.msgs_per_s,
    fmt(n.p99_turn_ms, "ms"), fmt(n.loop_lag_ms, "ms"), n.pid,
    Object.entries(n.labels || {}).map(([k, v]) => k + "=" + v).join(" ") || "",
  ], {"data-node": n.name, "data-state": n.state, "data-reachable": String(n.reachable)}));
}
function renderShards(s) {
  const owner = {};
  for (const sh of s.shards) owner[sh.shard] = sh;
  const cells = [];
  for (let i = 0; i < s.num_shards; i++) {
    const sh = owner[i];
    const c = el("div", i, {class: "cell", "data-shard": i, "data-owner": sh ? sh.owner : ""});
    if (sh) {
      c.style.background = color(sh.owner);
      const exp = sh.expires_in === null || sh.expires_in === undefined ? "?" : sh.expires_in + " s";
      c.title = `shard ${i}: ${sh.owner}, epoch ${sh.epoch}, lease expires in ≤ ${exp}`;
    } else c.title = `shard ${i}: unowned`;
    cells.push(c);
  }
  $("shards").replaceChildren(...cells);
  $("shard-summary").textContent = `${s.shards.length}/${s.num_shards} owned, lease TTL ${s.lease_ttl} s`;
  $("legend").replaceChildren(...s.nodes.map((n) => {
    const sp = el("span"); const i = el("i"); i.style.background = color(n.name);
    sp.append(i, `${n.name} (${n.shards})`); return sp;
  }));
}
function renderHistory(s) {
  rows("history", s.history.slice(0, 30), (t) => tr([clock(t.at), t.node, t.old, t.new,
    el("td", t.reason, {class: "reason"})]));
}
function renderTypes(s) {
  rows("types", s.agent_types, (t) => tr([t.type, t.nodes, t.activations, t.msgs_per_s,
    t.mailbox_pending]));
}
function renderDlq(s) {
  const m = s.mailbox || {};
  $("depths").textContent = `mailbox pending ${fmt(m.pending)}, dead letters ${fmt(m.dead_letters)}`;
  rows("dlq", s.dlq || [], (d) => {
    const act = el("td"); const b = el("button", "replay", {"data-seq": d.seq});
    b.addEventListener("click", () => replay(d.seq, b)); act.appendChild(b);
    return tr([act, d.seq, d.target, d.type, d.deliveries, clock(d.failed_at),
      el("td", d.reason, {class: "reason"})], {"data-seq": d.seq});
  });
}
async function replay(seq, button) {
  if (!confirm(`Replay dead letter ${seq} into its mailbox?`)) return;
  button.disabled = true;
  const r = await fetch(`/api/dlq/${seq}/replay`, {method: "POST",
    headers: {"X-Accord-Action": "replay"}});
  const body = await r.json();
  $("dlq-result").textContent = r.ok ? `replayed ${seq} as ${body.message_id}` : `error: ${body.error}`;
}
function renderServices(s) {
  const inst = [];
  for (const svc of s.services || []) {
    const name = `${svc.name} (${svc.healthy}/${svc.replicas} healthy)`;
    if (!svc.instances.length) inst.push([name, "–", "–", "–", "not running", "–"]);
    for (const i of svc.instances)
      inst.push([name, i.index, i.role, i.node, i.node_alive ? i.status : i.status + " (node gone)",
                 i.restarts]);
  }
  rows("services", inst, (c) => tr(c));
  const p = (s.promises && s.promises.promises) || [];
  const rep = (s.promises && s.promises.reputation) || {};
  const kept = (who) => (who in rep ? rep[who].ratio.toFixed(2) : "–");
  rows("promises", p, (x) => tr([x.name, x.promiser, x.outcome, kept(x.promiser),
    el("td", x.evidence, {class: "reason"})]));
  const ledger = ((s.promises && s.promises.ledger) || []).slice(-15).reverse();
  rows("ledger", ledger, (a) => tr([clock(a.at), a.promise, a.outcome, a.assessor,
    el("td", a.evidence, {class: "reason"})]));
}
function renderWorkflows(s) {
  const runs = s.workflows || [];
  const counts = {};
  for (const r of runs) counts[r.state] = (counts[r.state] || 0) + 1;
  $("wf-counts").textContent = Object.entries(counts).map(([k, v]) => `${k} ${v}`).join(", ");
  rows("workflows", runs.slice(-50).reverse(), (r) => tr([r.id, r.state, r.steps_done, r.attempts,
    clock(r.updated), el("td", r.error, {class: "reason"})]));
}
function renderTopology(s) {
  const svg = $("topology"); const ns = "http://www.w3.org/2000/svg";
  const nodes = s.topology.vertices.filter((v) => v.kind === "node");
  const svcs = s.topology.vertices.filter((v) => v.kind === "service");
  const pos = {};
  nodes.forEach((v, i) => { pos[v.id] = [60 + i * (480 / Math.max(1, nodes.length - 1 || 1)), 160]; });
  svcs.forEach((v, i) => { pos[v.id] = [60 + i * (480 / Math.max(1, svcs.length - 1 || 1)), 50]; });
  const parts = [];
  for (const e of s.topology.edges) {
    if (!(e.from in pos) || !(e.to in pos)) continue;
    const l = document.createElementNS(ns, "line");
    const [a, b] = [pos[e.from], pos[e.to]];
    l.setAttribute("x1", a[0]); l.setAttribute("y1", a[1]); l.setAttribute("x2", b[0]);
    l.setAttribute("y2", b[1]); l.setAttribute("stroke", "#aab3bf"); parts.push(l);
  }
  for (const v of [...nodes, ...svcs]) {
    const g = document.createElementNS(ns, "g");
    const c = document.createElementNS(ns, v.kind === "node" ? "circle" : "rect");
    const [x, y] = pos[v.id];
    if (v.kind === "node") {
      c.setAttribute("cx", x); c.setAttribute("cy", y); c.setAttribute("r", 18);
      c.setAttribute("fill", getComputedStyle(document.body).getPropertyValue("--" + v.state) || "#999");
    } else {
      c.setAttribute("x", x - 30); c.setAttribute("y", y - 12); c.setAttribute("width", 60);
      c.setAttribute("height", 24); c.setAttribute("rx", 4); c.setAttribute("fill", "#dfe6f3");
    }
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", x); t.setAttribute("y", v.kind === "node" ? y + 34 : y + 4);
    t.setAttribute("text-anchor", "middle"); t.setAttribute("font-size", "11");
    t.textContent = v.id.split(":")[1];
    g.append(c, t); parts.push(g);
  }
  svg.replaceChildren(...parts);
}
function renderErrors(s) {
  const errs = Object.entries(s.errors || {});
  $("errors-panel").hidden = !errs.length;
  $("errors").replaceChildren(...errs.map(([k, v]) => el("li", `${k}: ${v}`)));
}

function render(s) {
  $("cluster").textContent = `cluster ${s.cluster} · ${s.nodes.length} node(s) · seen by ${s.reporter}`;
  $("updated").textContent = "updated " + clock(s.at);
  for (const f of [renderNodes, renderShards, renderHistory, renderTypes, renderDlq,
                   renderServices, renderWorkflows, renderTopology, renderErrors]) {
    try { f(s); } catch (e) { console.error(f.name, e); }
  }
}
function live(state, text) { const b = $("live"); b.dataset.live = state; b.textContent = text; }

const source = new EventSource("/api/events");
source.addEventListener("snapshot", (ev) => { live("live", "live"); render(JSON.parse(ev.data)); });
source.addEventListener("unreachable", (ev) => live("down", JSON.parse(ev.data).error));
source.onerror = () => live("down", "dashboard server not answering");
