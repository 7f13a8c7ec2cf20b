// Shared by every page: the session, the API, DOM building (text only: a bin id or a
// label is data, never HTML), the live stream and formatting.
"use strict";

const SB = {
  BINS: ["recyclable", "kitchen", "hazardous", "other"],
  COLORS: { recyclable: "#1f6fd1", kitchen: "#2e9a48", hazardous: "#d23b3b", other: "#7a7f87" },
  MAX_ITEMS: 10000,
  session: null,
};

// Every page that receives a live item keeps it here: the benchmark reads the delay.
window.__smartbinItems = window.__smartbinItems || [];

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    // An object, set through CSSOM: the page's CSP refuses style attributes.
    else if (key === "style") Object.assign(node.style, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

async function api(path, options = {}) {
  const init = { credentials: "same-origin", headers: {}, ...options };
  if (init.method && init.method !== "GET") {
    init.headers["X-CSRF-Token"] = SB.session ? SB.session.csrf : "";
    init.headers["Content-Type"] = "application/json";
    if (init.body !== undefined && typeof init.body !== "string") init.body = JSON.stringify(init.body);
  }
  const response = await fetch(path, init);
  if (response.status === 401) {
    location.href = "/login?next=" + encodeURIComponent(location.pathname);
    throw new Error("not logged in");
  }
  let data;
  try { data = await response.json(); } catch (e) { data = { ok: false, error: `HTTP ${response.status}` }; }
  return data;
}

async function startSession() {
  SB.session = await api("/api/session");
  const who = document.getElementById("who");
  if (who) who.textContent = SB.session.role === "admin" ? "admin" : "read-only";
  const out = document.getElementById("logout");
  if (out) out.addEventListener("click", async () => {
    await api("/logout", { method: "POST" });
    location.href = "/login";
  });
  if (SB.session.role !== "admin") document.body.classList.add("readonly");
  return SB.session;
}

// Live updates: server-sent events; `handlers` maps an event name to a function.
function stream(query, handlers) {
  const source = new EventSource("/api/stream" + (query || ""));
  for (const [name, fn] of Object.entries(handlers)) {
    source.addEventListener(name, (ev) => {
      let data;
      try { data = JSON.parse(ev.data); } catch (e) { return; }
      if (name === "item") noteItem(data);
      fn(data);
    });
  }
  if (!handlers.item) source.addEventListener("item", (ev) => {
    try { noteItem(JSON.parse(ev.data)); } catch (e) { /* not ours */ }
  });
  // The badge says whether updates flow: the page's stream, and the dashboard's broker.
  const state = document.getElementById("live");
  let open = false;
  let broker = true;
  const show = () => {
    if (!state) return;
    state.textContent = !open ? "reconnecting" : broker ? "live" : "broker unreachable";
    state.className = "badge " + (open && broker ? "online" : "offline");
  };
  source.onopen = () => { open = true; show(); };
  source.onerror = () => { open = false; show(); };
  source.addEventListener("broker", (ev) => { broker = JSON.parse(ev.data).connected; show(); });
  source.addEventListener("fleet", (ev) => { broker = JSON.parse(ev.data).broker !== false; show(); });
  return source;
}

function noteItem(item) {
  const items = window.__smartbinItems;
  items.push({ bin: item.bin, seq: item.seq, time: item.time, received: Date.now() });
  if (items.length > SB.MAX_ITEMS) items.splice(0, items.length - SB.MAX_ITEMS);
}

// ------------------------------------------------------------------ formatting

function pct(rate) { return rate === null || rate === undefined ? "–" : (rate * 100).toFixed(1) + " %"; }
function num(n) { return n === null || n === undefined ? "?" : String(n); }
function clock(t) {
  if (t === null || t === undefined) return "–";
  const d = new Date(t * 1000);
  const today = new Date();
  const time = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  return d.toDateString() === today.toDateString() ? time : d.toLocaleDateString() + " " + time;
}
function ago(t) {
  if (t === null || t === undefined) return "–";
  const s = Math.max(0, Date.now() / 1000 - t);
  if (s < 60) return Math.round(s) + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  if (s < 86400) return Math.round(s / 3600) + " h ago";
  return Math.round(s / 86400) + " d ago";
}
function itemName(item) {
  if (!item) return "–";
  return item.label_en || item.label || item.error || "?";
}
function binDot(bin) { return el("span", { class: "dot bg-" + (SB.BINS.includes(bin) ? bin : "other") }); }
function onlineBadge(online) {
  return el("span", { class: "badge " + (online === "online" ? "online" : online === "offline" ? "offline" : ""),
    text: online || "unknown" });
}
function faultCount(view) {
  const faults = (view.state && view.state.faults) || {};
  return Object.values(faults).reduce((a, b) => a + b, 0);
}
