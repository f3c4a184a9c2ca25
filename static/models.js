/* Models panel (docs/models.md): catalog and cached local models with status and size, downloads with a
 * live progress bar (speed, ETA) and Cancel, Delete with confirmation.
 * Acts over REST (GET /api/cache/models, POST /api/models/download[/cancel], DELETE /api/cache/models/<org>/<name>)
 * and hears every page's Socket.IO events: `download_progress`, `download_done`, `error` {model}, `model_deleted`.
 * The model dropdown is refreshed by the `models` event the server sends to every page after a download
 * or a delete. Every value from the server is set with textContent. */
(function () {
  "use strict";
  const SB = window.Switchboard;
  if (!SB) return;
  const socket = SB.socket;

  const { el, bytes, duration, errorText } = window.SwitchboardUI;   // static/ui.js; styles in static/models.css

  const body = SB.addPanel("models-panel", "Models");
  const head = el("div", "mdl-head");
  const where = el("span", "mdl-root", "");
  const reload = el("button", "icon-button", "\u27f3", { type: "button", title: "Reload the list" });
  reload.setAttribute("aria-label", "Reload models");
  head.append(where, reload);
  const list = el("ul", "mdl-list");
  list.setAttribute("aria-live", "polite");
  const form = el("form", "mdl-form");          // any hub repo, not only the catalog's
  const repoInput = el("input", null, null, { type: "text", placeholder: "org/name from the hub", required: true,
                                               autocomplete: "off", spellcheck: false });
  repoInput.setAttribute("aria-label", "Hub model to download");
  form.append(repoInput, el("button", null, "Download", { type: "submit" }));
  const formError = el("div", "mdl-error", "", { hidden: true });
  formError.setAttribute("role", "alert");
  body.append(head, list, form, formError);
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const model = repoInput.value.trim();
    if (!model) return;
    formError.hidden = true;
    startDownload(model, (e) => { formError.hidden = false; formError.textContent = errorText(e); })
      .then(() => { if (formError.hidden) repoInput.value = ""; });
  });

  const rows = new Map();                    // model -> {data, node, parts}
  const errors = {};                         // model -> the last error shown on its row (until reloaded)

  function statusOf(d) {
    if (d.downloading) return { text: d.progress && d.progress.state === "waiting" ? "waiting" : "downloading", cls: "" };
    if (d.status === "ready") return { text: d.loaded ? "ready · loaded" : "ready", cls: "st-ready" };
    if (d.status === "incomplete") return { text: "incomplete", cls: "st-error" };
    return { text: d.bundled ? "bundled" : "not downloaded", cls: "" };
  }

  function renderRow(d) {
    const node = el("li", "mdl-row");
    node.dataset.model = d.model;
    const top = el("div", "mdl-top");
    const status = statusOf(d);
    top.append(el("span", "mdl-name", d.name && d.name !== d.model ? d.name : d.model),
               el("span", "badge mdl-status " + status.cls, status.text));
    const info = [d.model];
    if (d.size_bytes) info.push(bytes(d.size_bytes) + " on disk");
    else if (d.approx_size) info.push("~" + d.approx_size);
    if (d.status !== "ready" && d.reason && !d.downloading) info.push(d.reason);
    if (d.bundled && d.status === "not downloaded") info.push("converted from the bundled package on first use");
    const infoLine = el("div", "mdl-info", info.join(" · "));
    if (d.path) infoLine.title = d.path;
    const bar = el("progress", "mdl-bar", null, { max: 1, value: 0, hidden: true });
    const rate = el("div", "mdl-rate", "", { hidden: true });
    const err = el("div", "mdl-error", "", { hidden: true });
    err.setAttribute("role", "alert");
    const actions = el("div", "mdl-actions");
    if (d.downloading) {
      const cancel = el("button", null, "Cancel", { type: "button" });
      cancel.addEventListener("click", () => {
        cancel.disabled = true;
        post("/api/models/download/cancel", d.model).catch((e) => { showRowError(entry, e); load(); });
      });
      actions.append(cancel);
    } else {
      if (d.status !== "ready" && !(d.bundled && d.status === "not downloaded")) {
        const label = d.status === "incomplete" ? "Resume" : "Download";
        const get = el("button", "primary", label, { type: "button", title: "Download " + d.model + " into the model cache" });
        get.addEventListener("click", () => { get.disabled = true; startDownload(d.model); });
        actions.append(get);
      }
      if (d.status !== "not downloaded") {
        const del = el("button", null, "Delete", { type: "button" });
        del.addEventListener("click", () => remove(d, del));
        actions.append(del);
      }
    }
    node.append(top, infoLine, bar, rate, err, actions);
    const entry = { data: d, node: node, parts: { bar: bar, rate: rate, err: err, status: top.lastChild } };
    const lastError = errors[d.model] || (!d.downloading && d.error);
    if (lastError) showRowError(entry, lastError);
    if (d.downloading && d.progress) showProgress(entry, d.progress);
    return entry;
  }

  function showProgress(entry, p) {
    const { bar, rate, status } = entry.parts;
    bar.hidden = rate.hidden = false;
    if (p.state === "waiting") {
      bar.removeAttribute("value");            // indeterminate
      rate.textContent = "waiting for another process (pid " + (p.holder || "?") + ") that holds this model";
      status.textContent = "waiting";
      return;
    }
    if (p.total > 0) { bar.max = p.total; bar.value = Math.min(p.bytes, p.total); } else bar.removeAttribute("value");
    const parts = [p.total > 0 ? bytes(p.bytes) + " / " + bytes(p.total) : "starting…"];
    if (p.files_total) parts.push(p.files_done + "/" + p.files_total + " files");
    if (p.speed > 0) parts.push(bytes(p.speed) + "/s");
    if (typeof p.eta === "number" && p.bytes < p.total) parts.push(duration(p.eta) + " left");
    rate.textContent = parts.join(" · ");
    status.textContent = p.total > 0 ? "downloading " + Math.floor((100 * p.bytes) / p.total) + "%" : "downloading";
  }

  function showRowError(entry, e) {
    entry.parts.err.hidden = false;
    entry.parts.err.textContent = e.code === "cancelled" ? "cancelled; partial files are kept — Resume continues" : errorText(e);
  }

  function render(payload) {
    where.textContent = payload.root ? "cache: " + payload.root : "";
    where.title = payload.root || "";
    rows.clear();
    const items = (payload.models || []).map(renderRow);
    items.forEach((entry) => rows.set(entry.data.model, entry));
    list.replaceChildren(...items.map((entry) => entry.node));
    if (!items.length) list.append(el("li", "mdl-empty", "No local models."));
    if (payload.downloads_enabled === false) {
      list.prepend(el("li", "mdl-error", "Downloads are disabled: the server has no usable hub endpoint (models.endpoints)."));
    }
  }

  let loading = null, again = false;
  function load() {                           // one request at a time; a reload asked meanwhile runs after it
    if (loading) { again = true; return loading; }
    loading = SB.api("/api/cache/models")
      .then(render)
      .catch((e) => { list.replaceChildren(el("li", "mdl-error", errorText(e))); })
      .finally(() => { loading = null; if (again) { again = false; load(); } });
    return loading;
  }

  // REST rather than the socket events: a refusal (bad name) answers this request only, as an exception.
  const post = (path, model) => SB.postJSON(path, { model: model });
  function startDownload(model, onRefused) {
    delete errors[model];
    return post("/api/models/download", model).then(load).catch((e) => {
      if (onRefused) onRefused(e);
      else { const entry = rows.get(model); if (entry) showRowError(entry, e); load(); }
    });
  }

  function remove(d, button) {
    const size = d.size_bytes ? " (" + bytes(d.size_bytes) + ")" : "";
    if (!confirm("Delete " + d.model + size + " from the model cache?\n" + (d.path || ""))) return;
    button.disabled = true;
    const [org, name] = d.model.split("/");
    SB.api("/api/cache/models/" + encodeURIComponent(org) + "/" + encodeURIComponent(name), { method: "DELETE" })
      .then(load)
      .catch((e) => {
        button.disabled = false;
        const entry = rows.get(d.model);
        if (entry) showRowError(entry, e);
      });
  }

  socket.on("download_progress", (p) => {
    if (!p || !p.model) return;
    const entry = rows.get(p.model);
    if (!entry || !entry.data.downloading) {  // a download this page has not seen yet: fetch its row
      load();
      return;
    }
    showProgress(entry, p);
  });
  socket.on("download_done", (d) => { if (d && d.model) { delete errors[d.model]; load(); } });
  socket.on("model_deleted", () => load());
  const DOWNLOAD_SCOPES = ["download", "download_model", "cancel_download"];
  socket.on("error", (e) => {                 // errors of downloads (by `scope`, docs/protocol.md)
    if (!e || !DOWNLOAD_SCOPES.includes(e.scope) || !e.model) return;
    errors[e.model] = e;
    const entry = rows.get(e.model);
    if (entry) showRowError(entry, e);
    load();
  });
  socket.on("connect", () => load());        // after a reconnect, catch up with downloads that moved on
  reload.addEventListener("click", () => load());
  load();
})();
