// wharf balancer status page. Everything shown comes from /api/status(/stream) and is
// inserted with textContent / DOM nodes only — never as HTML — because names, tags and
// health output come from etcd and must not be able to inject markup (XSS).
"use strict";

const PALETTE = ["#2f6fcc", "#1f9d55", "#c27c0e", "#8e44ad", "#cc2f2f", "#16a2b8", "#6a7380"];

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k === "style") Object.assign(e.style, v);
    else e.setAttribute(k, String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.appendChild(typeof c === "object" ? c : document.createTextNode(String(c)));
  }
  return e;
}

function fmtRate(r) {
  if (r === null || r === undefined) return "–";
  return r >= 100 ? r.toFixed(0) : r.toFixed(1);
}
function fmtPct(x) {
  if (!x) return "0 %";
  const p = x * 100;
  return (p < 0.1 ? p.toFixed(2) : p.toFixed(1)) + " %";
}
function fmtMs(ms) {
  if (ms === null || ms === undefined) return "–";
  if (ms >= 1000) return (ms / 1000).toFixed(2) + " s";
  return (ms >= 10 ? ms.toFixed(0) : ms.toFixed(2)) + " ms";
}
function fmtAge(s) {
  if (s === null || s === undefined) return "–";
  if (s < 1) return "live";
  if (s < 120) return s.toFixed(0) + " s stale";
  return (s / 60).toFixed(0) + " min stale";
}
function fmtTime(ms) {
  const d = new Date(ms);
  return d.toLocaleTimeString([], { hour12: false });
}

function versionColor(versions, v) {
  const i = versions.indexOf(v);
  return PALETTE[(i < 0 ? versions.length : i) % PALETTE.length];
}

function renderService(s) {
  const versionNames = s.versions.map((v) => v.version);
  for (const sp of s.split) if (!versionNames.includes(sp.version)) versionNames.push(sp.version);
  const head = el("div", { class: "card-head" },
    el("h2", {}, s.name),
    el("span", { class: "tag" }, s.source),
    el("span", { class: "tag" }, s.algorithm),
    s.panic ? el("span", { class: "tag tag-panic", title: "no routable instance or no checker alive: routing to every serving instance" }, "panic mode") : null,
    el("span", { class: "muted" }, fmtRate(s.rps) + " req/s · " + fmtPct(s.error_rate) + " errors · p99 " + fmtMs(s.p99_ms)));
  const card = el("section", { class: "card service", "data-service": s.name }, head);

  if (s.split.length) {
    const bar = el("div", { class: "split", title: "traffic split by version" });
    for (const sp of s.split) {
      if (sp.percent <= 0) continue;
      bar.appendChild(el("div", { style: { width: sp.percent + "%", background: versionColor(versionNames, sp.version) } },
        sp.version + " " + sp.percent.toFixed(0) + "%"));
    }
    card.appendChild(bar);
  } else {
    card.appendChild(el("div", { class: "muted" }, "no split: every routable instance competes by weight"));
  }

  const vs = el("div", { class: "versions" });
  for (const v of s.versions) {
    vs.appendChild(el("div", { class: "version", style: { borderLeft: "4px solid " + versionColor(versionNames, v.version) } },
      el("b", {}, v.version), " · " + v.serving + "/" + v.instances + " serving · " + fmtRate(v.rps) + " req/s · " +
      fmtPct(v.error_rate) + " err · p99 " + fmtMs(v.p99_ms)));
  }
  card.appendChild(vs);

  const tbody = el("tbody");
  for (const i of s.instances) {
    const health = i.health
      ? el("span", { class: "out", title: "checker " + i.health.checker }, i.health.status + (i.health.output ? ": " + i.health.output : ""))
      : el("span", { class: "out" }, "no health mark yet");
    tbody.appendChild(el("tr", { class: "instance", "data-instance": i.id, "data-state": i.state },
      el("td", {}, i.id),
      el("td", {}, i.version),
      el("td", {}, i.node || "–"),
      el("td", {}, i.addr),
      el("td", {}, el("span", { class: "state state-" + i.state }, i.state)),
      el("td", { class: "num" }, i.weight),
      el("td", { class: "num" }, i.in_flight),
      el("td", { class: "num" }, fmtRate(i.rps)),
      el("td", { class: "num" + (i.error_rate > 0.01 ? " err" : "") }, fmtPct(i.error_rate)),
      el("td", { class: "num" }, fmtMs(i.p99_ms)),
      el("td", {}, health)));
  }
  const table = el("table", { class: "grid" },
    el("thead", {}, el("tr", {},
      ...["instance", "version", "node", "address", "state"].map((h) => el("th", {}, h)),
      ...["weight", "in flight", "req/s", "errors", "p99"].map((h) => el("th", { class: "num" }, h)),
      el("th", {}, "health"))),
    tbody);
  if (!s.instances.length) card.appendChild(el("p", { class: "muted" }, "no instances"));
  else card.appendChild(table);
  return card;
}

function render(st) {
  const t = st.totals;
  document.getElementById("t-services").textContent = t.services;
  document.getElementById("t-serving").textContent = t.serving + " / " + t.instances;
  document.getElementById("t-rps").textContent = fmtRate(t.rps);
  document.getElementById("t-errors").textContent = fmtPct(t.error_rate);
  document.getElementById("t-p99").textContent = fmtMs(t.p99_ms);
  const d = st.discovery;
  document.getElementById("t-discovery").textContent =
    d.source === "etcd" ? fmtAge(d.staleness_s) + " · rev " + d.revision : "static (lb.toml)";
  document.getElementById("window").textContent = st.window_s;
  document.getElementById("meta").textContent =
    "balancer " + st.balancer.version + " · up " + st.balancer.uptime_s + " s · updated " + fmtTime(st.generated_at_ms);

  const main = document.getElementById("services");
  const cards = st.services.map(renderService);
  if (!cards.length) cards.push(el("p", { class: "muted" }, "No services yet."));
  main.replaceChildren(...cards);

  const routes = document.querySelector("#routes tbody");
  const rows = [];
  for (const l of st.listeners) {
    for (const r of l.routes) {
      rows.push(el("tr", {}, el("td", {}, l.name), el("td", {}, r.host), el("td", {}, r.path_prefix),
        el("td", { class: r.known ? "" : "err", title: r.known ? "" : "unknown service: requests get 503" }, r.service)));
    }
  }
  routes.replaceChildren(...rows);

  const evs = st.events.slice(0, 100).map((e) =>
    el("li", { "data-kind": e.kind },
      el("time", { datetime: new Date(e.at_ms).toISOString() }, fmtTime(e.at_ms)),
      el("span", { class: "ev-kind ev-" + e.kind }, e.kind),
      el("span", {}, e.message)));
  if (!evs.length) evs.push(el("li", { class: "muted" }, "no events yet"));
  document.getElementById("events").replaceChildren(...evs);
  document.body.dataset.updated = String(st.generated_at_ms);
}

function setConn(cls, text) {
  const c = document.getElementById("conn");
  c.className = "conn " + cls;
  c.textContent = text;
}

// Live updates over server-sent events; if the stream cannot be used, poll once a second.
let pollTimer = null;
function poll() {
  fetch("/api/status", { cache: "no-store" })
    .then((r) => (r.ok ? r.json() : Promise.reject(r.status)))
    .then((st) => { render(st); setConn("conn-live", "live (polling)"); })
    .catch(() => setConn("conn-down", "disconnected"))
    .finally(() => { pollTimer = setTimeout(poll, 1000); });
}

function start() {
  if (!window.EventSource) { poll(); return; }
  const es = new EventSource("/api/status/stream");
  es.onmessage = (m) => {
    try { render(JSON.parse(m.data)); setConn("conn-live", "live"); }
    catch (e) { setConn("conn-down", "bad update"); }
  };
  es.onerror = () => setConn("conn-down", "reconnecting…");
}

document.addEventListener("DOMContentLoaded", start);
