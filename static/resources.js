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
  const unloadAll = el("button", "res-unload", "Unload all", {
    type: "button", title: "Free every local engine and Ollama's models (waits for running answers)" });
  body.append(summary, engines, ollama, lastSwitch, unloadAll);

  function render(status) {
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
    const loaded = (status.ollama && status.ollama.loaded) || [];
    ollama.textContent = loaded.length
      ? "Ollama holds: " + loaded.map((m) => m.name + " (" + bytes(m.size_vram || m.size) + " " + m.device + ")").join(", ")
      : "Ollama holds nothing";
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

  function refresh() {
    SB.api("/api/resources").then(render).catch(() => { /* shown again on the next event */ });
  }
  unloadAll.addEventListener("click", () => {
    unloadAll.disabled = true;
    SB.postJSON("/api/resources/unload", { engine: "all" })
      .catch(() => {}).finally(() => { unloadAll.disabled = false; refresh(); });
  });
  SB.socket.on("resource_status", render);
  SB.socket.on("connect", refresh);
  refresh();
})();
