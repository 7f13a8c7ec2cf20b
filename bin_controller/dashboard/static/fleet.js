// The fleet page: one row per bin, live, sortable, filtered.
"use strict";

const bins = new Map();  // bin id -> its snapshot (from the server's fleet view)
let sortKey = "id";
let sortDir = 1;

function sortValue(view, key) {
  const counts = view.counts || {};
  switch (key) {
    case "id": return view.id.toLowerCase();
    case "online": return view.online || "";
    case "state": return (view.state && view.state.state) || "";
    case "model": return ((view.state && view.state.model) || "") + " " + ((view.state && view.state.model_version) || "");
    case "contamination": return view.contamination && view.contamination.rate !== null ? view.contamination.rate : -1;
    case "last": return view.last && view.last.time ? view.last.time : 0;
    case "faults": return faultCount(view);
    default: return counts[key] === null || counts[key] === undefined ? -1 : counts[key];
  }
}

function matches(view) {
  const status = document.getElementById("status").value;
  if (status === "online" && view.online !== "online") return false;
  if (status === "offline" && view.online === "online") return false;
  if (status === "fault" && !((view.state && view.state.state === "fault") || faultCount(view) > 0)) return false;
  const words = document.getElementById("filter").value.trim().toLowerCase();
  if (!words) return true;
  const hay = [view.id, view.online, view.state && view.state.state, view.state && view.state.model,
    view.state && view.state.model_version, itemName(view.last)].join(" ").toLowerCase();
  return words.split(/\s+/).every((w) => hay.includes(w));
}

function stateCell(view) {
  const s = view.state || {};
  const name = s.state || "?";
  const cls = name === "fault" ? "badge fault" : name === "paused" || s.paused ? "badge paused" : "badge";
  return el("td", {}, el("span", { class: cls, text: s.paused && name !== "paused" ? name + " (paused)" : name }));
}

function fillCell(view) {
  if (!view.fill) return el("td", { class: "muted", text: "–" });
  // One small upright gauge per compartment; the number is in its tooltip.
  const gauges = SB.BINS.filter((b) => view.fill[b]).map((b) => {
    const f = view.fill[b];
    const height = f.pct === null ? 0 : Math.min(100, f.pct);
    return el("span", { class: "gauge" + (f.state === "full" ? " full" : ""),
      title: `${b}: ${f.pct === null ? "?" : f.pct.toFixed(0) + " %"}${f.state ? " (" + f.state + ")" : ""}` },
    el("span", { class: "bg-" + b, style: { height: height + "%" } }));
  });
  const most = Math.max(...SB.BINS.filter((b) => view.fill[b] && view.fill[b].pct !== null).map((b) => view.fill[b].pct), 0);
  return el("td", { class: "fill" }, el("span", { class: "gauges" }, gauges), el("span", { class: "small muted", text: most.toFixed(0) + " %" }));
}

function row(view) {
  const counts = view.counts || {};
  const state = view.state || {};
  const last = view.last;
  const faults = faultCount(view);
  const link = el("a", { href: "/bin/" + encodeURIComponent(view.id), text: view.id });
  return el("tr", { "data-bin": view.id },
    el("td", { class: "bin-id" }, link),
    el("td", {}, onlineBadge(view.online)),
    stateCell(view),
    el("td", { class: "small nowrap" }, (state.model || "?") + (state.model_version ? " v" + state.model_version : "")),
    ...SB.BINS.map((b) => el("td", { class: "num count-" + b, text: num(counts[b]) })),
    el("td", { class: "num count-total", text: num(counts.total) }),
    el("td", { class: "num contamination", text: view.contamination ? pct(view.contamination.rate) : "–" }),
    el("td", { class: "small nowrap" }, last ? [binDot(last.bin), itemName(last), el("div", { class: "muted", text: ago(last.time) })] : "–"),
    fillCell(view),
    el("td", { class: "num" + (faults ? " c-hazardous" : ""), title: state.last_fault || "", text: String(faults) }));
}

function render() {
  const body = document.querySelector("#fleet tbody");
  const shown = [...bins.values()].filter(matches).sort((a, b) => {
    const x = sortValue(a, sortKey), y = sortValue(b, sortKey);
    return (x < y ? -1 : x > y ? 1 : 0) * sortDir || a.id.localeCompare(b.id);
  });
  body.replaceChildren(...shown.map(row));
  document.getElementById("empty").hidden = bins.size > 0 && shown.length > 0;
  document.getElementById("empty").textContent = bins.size ? "No bin matches the filter." : "Waiting for bins…";
  const online = [...bins.values()].filter((v) => v.online === "online").length;
  document.getElementById("summary").textContent = `${bins.size} bins, ${online} online`;
  for (const th of document.querySelectorAll("#fleet th.sortable")) {
    th.classList.toggle("sorted-asc", th.dataset.key === sortKey && sortDir === 1);
    th.classList.toggle("sorted-desc", th.dataset.key === sortKey && sortDir === -1);
  }
}

let pending = false;
function later() {
  if (pending) return;
  pending = true;
  requestAnimationFrame(() => { pending = false; render(); });
}

for (const th of document.querySelectorAll("#fleet th.sortable")) {
  th.addEventListener("click", () => {
    if (sortKey === th.dataset.key) sortDir = -sortDir; else { sortKey = th.dataset.key; sortDir = 1; }
    render();
  });
}
document.getElementById("filter").addEventListener("input", render);
document.getElementById("status").addEventListener("change", render);
setInterval(render, 10000);  // the "ago" column

startSession().then(() => {
  stream("", {
    fleet: (data) => { bins.clear(); for (const v of data.bins) bins.set(v.id, v); render(); },
    bin: (view) => { bins.set(view.id, view); later(); },
    item: (event) => {
      const view = bins.get(event.bin);
      if (view && (!view.last || view.last.seq === null || event.seq >= view.last.seq)) { view.last = event.item; later(); }
    },
  });
});
