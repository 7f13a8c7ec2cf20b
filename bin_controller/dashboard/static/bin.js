// One bin's page: live counts and state, the last item, controls, charts, faults, review.
"use strict";

const binId = decodeURIComponent(location.pathname.replace(/^\/bin\//, ""));
const binUrl = "/api/bins/" + encodeURIComponent(binId);
let view = null;
let charts = { hours: null, rates: null };
const knownLabels = new Set();

document.getElementById("bin-id").textContent = binId;
document.title = "smartbin · " + binId;

function fact(list, term, value, id) {
  list.append(el("dt", { text: term }), el("dd", id ? { id } : {}, value));
}

function renderView() {
  if (!view) return;
  const s = view.state || {};
  document.getElementById("online").replaceChildren(onlineBadge(view.online));
  const state = document.getElementById("state");
  state.textContent = s.state || "?";
  state.className = "badge" + (s.state === "fault" ? " fault" : s.state === "paused" ? " paused" : "");
  document.getElementById("model").textContent =
    s.model ? `model ${s.model}${s.model_version ? " v" + s.model_version : ""}${s.backend ? " · " + s.backend : ""}` : "";

  const counts = view.counts || {};
  document.getElementById("counts").replaceChildren(
    ...SB.BINS.map((b) => el("div", { class: "count " + b, id: "count-" + b },
      el("div", { class: "what", text: b }), el("div", { class: "n", text: num(counts[b]) }))),
    el("div", { class: "count total", id: "count-total" },
      el("div", { class: "what", text: "total" }), el("div", { class: "n", text: num(counts.total) })));

  const last = view.last;
  const facts = document.getElementById("last");
  facts.replaceChildren();
  if (last) {
    fact(facts, "item", itemName(last), "last-label");
    fact(facts, "seq", num(last.seq), "last-seq");
    fact(facts, "bin", [binDot(last.bin), last.bin || "?"]);
    fact(facts, "confidence", last.confidence === null ? "–" : pct(last.confidence));
    fact(facts, "when", clock(last.time));
    if (last.uncertain || last.failed) fact(facts, "flag", last.failed ? "failed" : "uncertain");
  } else {
    fact(facts, "item", "none yet");
  }
  const img = document.getElementById("last-photo");
  if (view.image_seq !== null && view.image_seq !== undefined) {
    const src = binUrl + "/image?seq=" + view.image_seq;
    if (img.getAttribute("src") !== src) img.src = src;
    img.hidden = false;
  } else if (view.image_seq === null && img.hidden === false && !view.last) {
    img.hidden = true;
  }

  const status = document.getElementById("status");
  status.replaceChildren();
  const c = view.contamination;
  fact(status, "contamination", c ? pct(c.rate) : "– (no site log)", "contamination");
  if (c) fact(status, "reviewed", `${pct(c.reviewed_fraction)} of items (${num(c.reviewed)}, ${num(c.wrong)} wrong)`);
  fact(status, "state detail", s.detail || "–");
  fact(status, "paused", s.paused === null || s.paused === undefined ? "?" : s.paused ? "yes" : "no", "paused");
  const teach = s.teach;
  if (teach) {
    // Running: the phase and its steps. Ended (also the last teach, kept over a restart):
    // the phase, when, and the version installed or why not.
    const ended = teach.finished !== null && teach.finished !== undefined;
    const step = !ended && teach.total ? ` ${num(teach.done)} / ${num(teach.total)}` : "";
    const when = ended ? " " + clock(teach.finished) : "";
    const tail = teach.error || (teach.phase === "done" && teach.version ? "model " + teach.version : "");
    fact(status, "teach", (teach.phase || "?") + step + when + (tail ? " · " + tail : ""), "teach");
  }
  const st = view.stats || {};
  if (st.uptime_s !== undefined) {
    fact(status, "uptime", st.uptime_s === null ? "?" : (st.uptime_s / 3600).toFixed(1) + " h");
    fact(status, "items per hour", num(st.items_per_hour));
    fact(status, "cycle p95", st.cycle_ms_p95 === null ? "–" : st.cycle_ms_p95.toFixed(0) + " ms");
    fact(status, "outbox", num(st.outbox));
    if (st.cpu_temperature_c !== null) fact(status, "CPU", st.cpu_temperature_c.toFixed(0) + " °C");
  }
  if (view.fill) {
    fact(status, "fill", el("span", {}, SB.BINS.filter((b) => view.fill[b]).map((b) => {
      const f = view.fill[b];
      return el("span", { class: "small", title: b }, el("span", { class: "fillbar" },
        el("span", { class: "bg-" + b, style: { width: (f.pct || 0) + "%" } })),
      (f.pct === null ? "?" : f.pct.toFixed(0) + " %") + (f.state === "full" ? " full" : "") + "  ");
    })));
  }
  const faults = s.faults || {};
  const kinds = Object.entries(faults).map(([k, n]) => `${k} ${n}`).join(", ");
  fact(status, "faults", kinds || "none", "fault-counts");
  if (s.last_fault) fact(status, "last fault", s.last_fault);
}

// ------------------------------------------------------------------ controls

function showReply(box, what, reply) {
  box.className = "reply " + (reply.ok ? "ok" : "error");
  if (reply.ok) {
    const extra = Object.entries(reply).filter(([k]) => !["ok", "id", "command"].includes(k))
      .map(([k, v]) => `${k}: ${typeof v === "object" ? JSON.stringify(v) : v}`).join(", ");
    box.textContent = `${what}: ok${extra ? " (" + extra + ")" : ""}`;
  } else {
    box.textContent = `${what}: error: ${reply.error || "unknown error"}`;
  }
}

function setupControls() {
  const target = document.getElementById("target");
  target.replaceChildren(...SB.BINS.map((b) => el("option", { value: b, text: b })));
  const box = document.getElementById("reply");
  for (const button of document.querySelectorAll("[data-cmd]")) {
    const name = button.dataset.cmd;
    if (SB.session.role !== "admin") { button.disabled = true; button.title = "read-only login"; }
    button.addEventListener("click", async () => {
      const body = name === "sort_next" || name === "calibrate" ? { bin: target.value } : {};
      box.className = "reply"; box.textContent = `${name}: waiting for the bin…`;
      button.disabled = true;
      try {
        showReply(box, name, await api(`${binUrl}/cmd/${name}`, { method: "POST", body }));
      } catch (e) {
        showReply(box, name, { ok: false, error: String(e) });
      } finally {
        button.disabled = false;
      }
    });
  }
}

// ------------------------------------------------------------------ charts

function chartWidth(id) { return Math.max(300, document.getElementById(id).clientWidth); }

function drawHours(h) {
  const x = h.hours;
  const cum = [];
  let run = x.map(() => 0);
  for (const b of SB.BINS) { run = run.map((v, i) => v + h.per_hour[b][i]); cum.push(run); }
  // Stacked: the tallest (everything up to "other") drawn first, each lower one over it.
  const order = [3, 2, 1, 0];
  const bars = uPlot.paths.bars({ size: [0.7, 40] });
  const opts = {
    width: chartWidth("chart-hours"), height: 220, legend: { show: false },
    scales: { x: { time: true }, y: { range: (u, lo, hi) => [0, Math.max(4, hi * 1.1)] } },
    axes: [{}, { values: (u, v) => v.map((n) => Number.isInteger(n) ? n : "") }],
    series: [{}, ...order.map((i) => ({ label: SB.BINS[i], fill: SB.COLORS[SB.BINS[i]], stroke: SB.COLORS[SB.BINS[i]], paths: bars, points: { show: false } }))],
  };
  const data = [x, ...order.map((i) => cum[i])];
  if (charts.hours) charts.hours.destroy();
  charts.hours = new uPlot(opts, data, document.getElementById("chart-hours"));
  document.getElementById("legend-hours").replaceChildren(
    ...SB.BINS.map((b) => el("span", {}, el("span", { class: "dot bg-" + b }), b)));
}

function drawRates(h) {
  const points = new Map();
  h.hours.forEach((t, i) => {
    if (h.uncertain_rate[i] !== null) points.set(t + 1800, [h.uncertain_rate[i], null]);
  });
  h.contamination.time.forEach((t, i) => {
    const p = points.get(t) || [null, null];
    p[1] = h.contamination.rate[i];
    points.set(t, p);
  });
  const xs = [...points.keys()].sort((a, b) => a - b);
  const data = [xs, xs.map((t) => points.get(t)[0]), xs.map((t) => points.get(t)[1])];
  const percent = (u, v) => v.map((n) => (n * 100).toFixed(0) + " %");
  const opts = {
    width: chartWidth("chart-rates"), height: 220,
    scales: { x: { time: true, range: [h.hours[0], h.hours[h.hours.length - 1] + 3600] }, y: { range: [0, 1] } },
    axes: [{}, { values: percent, size: 60 }],
    series: [{}, { label: "uncertain or failed", stroke: "#c98a00", width: 2, spanGaps: true, value: (u, v) => pct(v), points: { show: true, size: 6, fill: "#c98a00" } },
      { label: "contamination", stroke: "#d23b3b", width: 2, spanGaps: true, value: (u, v) => pct(v), points: { show: true, size: 6, fill: "#d23b3b" } }],
  };
  if (charts.rates) charts.rates.destroy();
  charts.rates = new uPlot(opts, data, document.getElementById("chart-rates"));
}

function drawComposition(h) {
  const box = document.getElementById("composition");
  const most = Math.max(1, ...h.composition.map((c) => c.count));
  box.replaceChildren(...h.composition.map((c) => {
    knownLabels.add(c.label);
    return el("div", { class: "bar-row" },
      el("span", { title: c.label }, binDot(c.bin), c.label),
      el("span", { class: "track" }, el("span", { class: "bg-" + (c.bin || "other"), style: { width: (100 * c.count / most) + "%" } })),
      el("span", { class: "num", text: String(c.count) }));
  }));
  if (!h.composition.length) box.append(el("div", { class: "empty", text: "No items in the last 24 hours." }));
  updateLabels();
}

function drawFaults(faults) {
  const body = document.querySelector("#faults tbody");
  body.replaceChildren(...faults.map((f) => el("tr", {},
    el("td", { class: "small", text: clock(f.time) }), el("td", {}, el("span", { class: "badge fault", text: f.kind })),
    el("td", { class: "small", text: f.detail }))));
  document.getElementById("no-faults").hidden = faults.length > 0;
}

let history = null;
let historyTimer = null;
async function loadHistory() {
  historyTimer = null;
  const h = await api(binUrl + "/history?hours=24");
  if (!h.hours) return;
  history = h;
  drawHours(h); drawRates(h); drawComposition(h); drawFaults(h.faults);
}
function historySoon() { if (!historyTimer) historyTimer = setTimeout(loadHistory, 3000); }
window.addEventListener("resize", () => { if (history) { drawHours(history); drawRates(history); } });

// ------------------------------------------------------------------ review

function updateLabels() {
  document.getElementById("labels").replaceChildren(
    ...[...knownLabels].sort().map((l) => el("option", { value: l })));
}

function reviewCard(item) {
  const box = document.getElementById("review-reply");
  const readonly = SB.session.role !== "admin";
  for (const l of [item.label_en, item.label]) if (l) knownLabels.add(l);
  const label = el("input", { type: "text", list: "labels", placeholder: "right label", "aria-label": "right label" });
  const bin = el("select", { "aria-label": "its bin" },
    el("option", { value: "", text: "label's own bin" }), ...SB.BINS.map((b) => el("option", { value: b, text: b })));
  const card = el("div", { class: "item" + (item.review ? " done" : ""), "data-seq": item.seq });
  async function verdict(kind, body) {
    const reply = await api(`${binUrl}/review/${kind}`, { method: "POST", body });
    showReply(box, `${kind} #${item.seq}`, reply);
    if (reply.ok) card.classList.add("done");
  }
  const accept = el("button", { type: "button", class: "accept", disabled: readonly, text: "Correct",
    onclick: () => verdict("accept", { seq: item.seq }) });
  const set = el("button", { type: "button", class: "set-label primary", disabled: readonly, text: "Set label",
    onclick: () => {
      if (!label.value.trim()) { label.focus(); return; }
      verdict("label", { seq: item.seq, label: label.value.trim(), bin: bin.value || null });
    } });
  const flag = item.failed ? "failed" : item.uncertain ? "uncertain" : "";
  card.append(
    item.photo ? el("img", { src: `${binUrl}/photo/${item.seq}`, alt: "photo of item " + item.seq, loading: "lazy" })
      : el("div", { class: "empty", text: "no photo kept" }),
    el("div", {}, el("strong", { text: itemName(item) }), " ",
      el("span", { class: "muted small", text: `#${item.seq} · ${item.confidence === null ? "?" : pct(item.confidence)}` }),
      flag ? el("span", { class: "badge paused", text: flag }) : null),
    el("div", { class: "small" }, "went to ", binDot(item.compartment), item.compartment || "?",
      item.review ? el("span", { class: "muted", text: ` · reviewed: ${item.review.label || item.review.verdict} (${item.review.bin})` }) : null),
    el("div", { class: "row" }, accept),
    label,
    el("div", { class: "row" }, bin, set));
  return card;
}

async function loadReview() {
  const queue = document.getElementById("review-filter").value;
  const list = document.getElementById("review");
  const reply = await api(`${binUrl}/review?queue=${queue}&limit=12`);
  if (!reply.ok) {
    list.replaceChildren(el("div", { class: "empty", text: "Review list: " + (reply.error || "no reply") }));
    return;
  }
  list.replaceChildren(...reply.items.map(reviewCard));
  if (!reply.items.length) list.append(el("div", { class: "empty", text: "Nothing to review." }));
  document.getElementById("review-total").textContent = `${reply.total} items`;
  updateLabels();
}

// ------------------------------------------------------------------ start

startSession().then(async () => {
  setupControls();
  const first = await api(binUrl);
  if (first.id !== undefined) { view = first; renderView(); }
  else document.getElementById("bin-id").textContent = binId + " (not seen on the broker)";
  stream("?bin=" + encodeURIComponent(binId), {
    fleet: (data) => { if (data.bins.length) { view = data.bins[0]; renderView(); } },
    bin: (v) => {
      const rate = (x) => (x && x.contamination ? x.contamination.rate : null);
      if (view && rate(view) !== rate(v)) historySoon();  // a review moved the rate chart
      view = v; renderView();
    },
    item: (event) => {
      if (view && (!view.last || view.last.seq === null || event.seq >= view.last.seq)) { view.last = event.item; renderView(); }
      historySoon();
    },
    fault: () => historySoon(),
  });
  document.getElementById("review-filter").addEventListener("change", loadReview);
  document.getElementById("review-refresh").addEventListener("click", loadReview);
  loadHistory();
  loadReview();
});
