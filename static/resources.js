/* Resources panel: what is loaded where, memory, leases, and what the last switch freed.
 * Fed by GET /api/resources once and the `resource_status` Socket.IO event after every change.
 * All data is set with textContent. */
(function () {
  "use strict";
  const SB = window.Switchboard;
  if (!SB) return;

  const { el, bytes, memoryChange } = window.SwitchboardUI;   // static/ui.js; styles in static/resources.css

  function ago(ts) {
    if (!ts) return "never";
    const s = Math.max(0, Date.now() / 1000 - ts);
    return s < 60 ? Math.round(s) + " s ago" : Math.round(s / 60) + " min ago";
  }

  const body = SB.addPanel("resources-panel", "Resources");
  const summary = el("div", "res-summary");
  const engines = el("ul", "res-engines");
  const ollama = el("div", "res-ollama");
  const lastSwitch = el("div", "res-switch");
  const planLine = el("div", "res-plan");
  planLine.setAttribute("aria-live", "polite");
  const estimates = el("div", "res-estimates");
  const unloadAll = el("button", "res-unload", "Unload all", {
    type: "button", title: "Free every local engine and Ollama's models (waits for running answers)" });
  const cluster = el("div", "res-cluster");
  const pools = el("ul", "res-pools");
  body.append(summary, engines, ollama, cluster, pools, planLine, lastSwitch, estimates, unloadAll);
  // With several processes (server.redis_url) every process's status reaches every page: this page
  // shows its own process's (the one GET /api/resources answered) and only the others' holdings.
  let ownInstance = null;

  function renderCluster(c) {
    if (!c) { cluster.textContent = ""; return; }
    const others = (c.members || []).filter((m) => m.instance !== c.instance);
    cluster.textContent = "process " + c.instance + " of " + (c.members || []).length + (others.length
      ? " · others hold: " + others.map((m) => m.instance + " " + (m.models.join(", ") || "nothing")).join("; ") : "");
  }

  function renderPools(all) {
    pools.replaceChildren();
    for (const [key, pool] of Object.entries(all || {})) {
      for (const m of pool.members || []) {
        const state = m.healthy ? "healthy" : "cooling down" + (m.cooling_down_until
          ? " for " + Math.max(0, Math.round(m.cooling_down_until - Date.now() / 1000)) + " s" : "");
        const error = m.last_error ? " · last error " + m.last_error.code : "";
        pools.append(el("li", "res-pool-member " + (m.healthy ? "healthy" : "cooling"),
          key + " · " + m.url + " · " + state + " · " + m.in_flight + " in flight · " + m.served + " served" + error));
      }
    }
  }

  function fromSocket(status) {
    const from = status.cluster && status.cluster.instance;
    if (from && ownInstance && from !== ownInstance) return;  // another process's own view
    render(status);
  }

  function render(status) {
    renderCluster(status.cluster);
    renderPools(status.pools);
    const dev = status.devices || {};
    const gpus = (dev.gpus || []).map((g) => "GPU" + g.gpu + " " + bytes(g.used) + " / " + bytes(g.total)).join(", ");
    summary.textContent = "policy " + status.policy + " · process " + bytes(dev.process_rss) +
      " · RAM free " + bytes(dev.ram_available) + (gpus ? " · " + gpus : " · no GPU");
    engines.replaceChildren();
    if (!status.engines.length) engines.append(el("li", "res-empty", "no local engine loaded yet"));
    for (const e of status.engines) {
      const item = el("li", "res-engine state-" + e.state);
      item.dataset.key = e.key;
      const waiting = e.waiting_for_leases ? " · waiting for " + e.leases + " answer(s) to finish" : "";
      item.append(el("span", "res-role", e.roles.join("+")), el("span", "res-model", e.model),
        el("span", "res-state", e.state + (e.state === "loaded" ? " on " + e.device + " · " + bytes(e.bytes) : "") +
          " · used " + ago(e.last_used) + (e.leases ? " · in use" : "") + waiting));
      engines.append(item);
    }
    // Every other runtime that holds memory (Ollama, vLLM, llama.cpp's router, llama-swap, LM Studio).
    const held = [];
    for (const [key, info] of Object.entries(status.runtimes || {})) {
      for (const m of info.loaded || []) {
        const size = m.size_vram || m.size;
        held.push(key + ": " + m.name + (size ? " (" + bytes(size) + (m.device ? " " + m.device : "") + ")" : ""));
      }
    }
    ollama.textContent = held.length ? "other runtimes hold: " + held.join(", ") : "other runtimes hold nothing";
    const loads = status.loads || [];
    const last = loads[loads.length - 1];
    estimates.textContent = last
      ? "last load: " + last.model + " predicted " + bytes(last.predicted) + " (" + last.predicted_from + "), measured " +
        bytes(last.bytes) + (last.error === null ? "" : " · error " + (last.error * 100).toFixed(0) + "%")
      : "";
    // The *_freed figures are before − after across the whole switch (unloads and the new load), so
    // loading a model usually makes them negative: memoryChange says "grew by" rather than "freed -…".
    const s = status.last_switch;
    const changes = s ? [memoryChange("RAM", s.rss_freed)] : [];
    if (s && (s.gpu_freed || (dev.gpus || []).length)) changes.push(memoryChange("GPU memory", s.gpu_freed));
    lastSwitch.textContent = s
      ? "last switch: " + (s.from || "—") + " → " + s.to + " in " + s.took_ms + " ms; " + changes.join(", ") +
        (s.unloaded.length ? " (unloaded " + s.unloaded.join(", ") + ")" : "")
      : "no switch yet";
  }

  // Picking a model that is not resident shows what switching to it would do, before any message.
  function describePlan(p) {
    if (p.loaded && !(p.release || []).length) return "";
    if (!p.fits) return "switching to " + p.model + " is not possible: " + p.reason;
    const parts = (p.release || []).map((r) => "unload " + r.model + (r.runtime === "local" ? "" : " from " + r.runtime) +
      (r.bytes ? " (" + bytes(r.bytes) + ")" : ""));
    if (!p.loaded && p.need_bytes) parts.push("load " + bytes(p.need_bytes) + " of " + bytes(p.free_bytes) + " free");
    const secs = p.seconds && p.seconds.load;
    return "switching will " + (parts.join(", ") || "change nothing") + (typeof secs === "number" ? ", ~" + secs.toFixed(1) + " s" : "");
  }
  function showPlan(model) {
    if (!model) { planLine.textContent = ""; return; }
    SB.api("/api/resources/plan?model=" + encodeURIComponent(model))
      .then((p) => { planLine.textContent = describePlan(p); })
      .catch(() => { planLine.textContent = ""; });
  }
  const select = document.getElementById("model-select");
  if (select) select.addEventListener("change", () => showPlan(select.value));

  function refresh() {
    SB.api("/api/resources").then((status) => {
      if (status.cluster) ownInstance = status.cluster.instance;
      render(status);
    }).catch(() => { /* shown again on the next event */ });
  }
  unloadAll.addEventListener("click", () => {
    unloadAll.disabled = true;
    SB.postJSON("/api/resources/unload", { engine: "all" })
      .catch(() => {}).finally(() => { unloadAll.disabled = false; refresh(); });
  });
  SB.socket.on("resource_status", fromSocket);
  SB.socket.on("connect", refresh);
  refresh();
})();
