/* Knowledge and translation on the chat page (docs/knowledge.md).
 * - a "use knowledge" checkbox by the composer: chats are sent with `knowledge: true`;
 * - `citations` rendered under the answer they belong to;
 * - a Knowledge panel: upload, indexing progress (`knowledge_progress`), list, delete;
 * - a Translate panel: `translate` → `translation_delta` … `translation_done`.
 * User data (file names, excerpts, translations) is only ever set with textContent. */
(function () {
  "use strict";
  const SB = window.Switchboard;
  if (!SB) return;
  const socket = SB.socket;

  const { el, bytes, errorText } = window.SwitchboardUI;   // static/ui.js

  // ---------- "use knowledge" checkbox ----------
  const KEY = "switchboard.knowledge";
  const actions = document.querySelector("#composer .composer-actions");
  const useBox = el("input", null, null, { type: "checkbox", id: "use-knowledge" });
  useBox.checked = localStorage.getItem(KEY) === "1";
  const useLabel = el("label", "kb-toggle", null, { htmlFor: "use-knowledge",
    title: "Answer from your uploaded documents, with citations" });
  useLabel.append(useBox, document.createTextNode(" use knowledge"));
  if (actions) actions.prepend(useLabel);
  useBox.addEventListener("change", () => localStorage.setItem(KEY, useBox.checked ? "1" : "0"));
  SB.onChatPayload((payload) => { if (useBox.checked) payload.knowledge = true; });

  // ---------- citations under the answer ----------
  const citations = {};                       // message id -> sources (kept for re-renders of the chat)
  const stillIndexing = {};                   // message id -> documents not yet indexed when it was asked
  const messages = document.getElementById("messages");
  function citationBlock(sources) {
    const block = el("div", "citations");
    if (!sources.length) {
      block.append(el("div", "citations-none", "No passage in your documents is relevant to this question."));
      return block;
    }
    block.append(el("div", "citations-title", "Sources"));
    const list = el("ol", "citations-list");
    for (const s of sources) {
      const item = el("li", "citation");
      const head = el("div", "citation-head");
      const where = s.page ? s.document + " · page " + s.page : s.document;
      head.append(el("span", "citation-doc", where),
                  el("span", "citation-score", "score " + Number(s.score || 0).toFixed(2)));
      const details = el("details", "citation-excerpt");
      details.append(el("summary", null, "excerpt"), el("p", null, s.excerpt || ""));
      item.append(head, details);
      list.append(item);
    }
    block.append(list);
    return block;
  }
  function attachCitations(bubble) {
    const sources = citations[bubble.dataset.messageId];
    if (!sources || bubble.querySelector(".citations")) return;
    const block = citationBlock(sources);
    const pending = stillIndexing[bubble.dataset.messageId];
    if (pending) block.append(el("div", "citations-none", pending + (pending === 1 ? " document was" : " documents were") +
                                  " still being indexed and not searched."));
    const meta = bubble.querySelector(".meta");
    if (meta) bubble.insertBefore(block, meta); else bubble.append(block);
  }
  function attachAll() {
    for (const id of Object.keys(citations)) {
      const bubble = messages.querySelector('.message[data-message-id="' + CSS.escape(id) + '"]');
      if (bubble) attachCitations(bubble);
    }
  }
  SB.onHistory((msgs) => {                    // stored with the answer: shown again after a reload
    for (const m of msgs) if (Array.isArray(m.citations)) citations[m.id] = m.citations;
  });
  socket.on("citations", (d) => {
    if (!d || !d.message_id) return;
    citations[d.message_id] = Array.isArray(d.sources) ? d.sources : [];
    if (d.indexing) stillIndexing[d.message_id] = d.indexing;
    attachAll();
  });
  socket.on("knowledge_waiting", (d) => {     // asked right after an upload: the answer waits for the index
    const s = SB.state.stream;
    if (!d || !s || s.chatId !== d.chat_id || SB.state.chatId !== d.chat_id) return;
    const docs = Array.isArray(d.documents) ? d.documents : [];
    const names = docs.map((doc) => doc.name + (doc.total ? " " + doc.done + "/" + doc.total : "")).join(", ");
    SB.setStreamStatus("waiting for " + (names || "documents") + " to be indexed…");
  });
  if (messages) new MutationObserver(attachAll).observe(messages, { childList: true });

  // ---------- knowledge panel ----------
  const kb = SB.addPanel("knowledge-panel", "Knowledge");
  const fileInput = el("input", null, null, { type: "file", multiple: true, id: "kb-file",
    accept: ".txt,.md,.markdown,.html,.htm,.pdf" });
  fileInput.setAttribute("aria-label", "Documents to upload");
  const uploadBtn = el("button", "primary", "Upload", { type: "button", id: "kb-upload" });
  const kbStatus = el("div", "kb-status", null);
  kbStatus.setAttribute("aria-live", "polite");
  const docList = el("ul", "kb-list", null, { id: "kb-list" });
  kb.append(el("div", "kb-upload", null), kbStatus, docList);
  kb.firstChild.append(fileInput, uploadBtn);
  kb.append(el("p", "kb-hint", ".txt .md .html .pdf, up to 20 MB each; tick “use knowledge” to ask them."));

  const rows = {};                            // document id -> {row, bar, info}
  function renderDoc(doc) {
    const row = el("li", "kb-doc");
    row.dataset.documentId = doc.id;
    const name = el("span", "kb-name", doc.name, { title: doc.collection + " · " + doc.sha256.slice(0, 12) });
    const info = el("span", "kb-info");
    const bar = el("progress", "kb-progress", null, { max: 1, value: 0 });
    const del = el("button", "kb-delete", "×", { type: "button", title: "Delete " + doc.name });
    del.setAttribute("aria-label", "Delete " + doc.name);
    del.addEventListener("click", () => removeDoc(doc));
    row.append(name, del, info, bar);
    rows[doc.id] = { row: row, bar: bar, info: info };
    showProgress(doc.id, doc.status, (doc.progress || {}).done || 0, (doc.progress || {}).total || 0, doc);
    return row;
  }
  function showProgress(id, status, done, total, doc) {
    const r = rows[id];
    if (!r) return;
    r.row.dataset.status = status;
    if (status === "indexing") {
      r.bar.hidden = false;
      r.bar.max = total || 1;
      r.bar.value = total ? done : 0;
      r.info.textContent = total ? "indexing " + done + "/" + total + " chunks" : "reading…";
    } else {
      r.bar.hidden = true;
      if (doc && status === "ready") r.info.textContent = doc.chunks + " chunks · " + bytes(doc.size_bytes);
    }
  }
  async function loadDocs() {
    try {
      const data = await SB.api("/api/knowledge/documents");
      docList.replaceChildren();
      for (const key of Object.keys(rows)) delete rows[key];
      const docs = (data && data.documents) || [];
      for (const doc of docs) docList.append(renderDoc(doc));
      if (!docs.length) docList.append(el("li", "kb-empty", "No documents yet."));
    } catch (e) {
      kbStatus.textContent = errorText(e);
    }
  }
  async function upload() {
    const files = Array.from(fileInput.files || []);
    if (!files.length) { kbStatus.textContent = "Choose a file first."; return; }
    uploadBtn.disabled = true;
    const problems = [];
    for (const file of files) {
      kbStatus.textContent = "uploading " + file.name + "…";
      const form = new FormData();
      form.append("file", file, file.name);
      try {
        const data = await SB.api("/api/knowledge/documents", { method: "POST", body: form });
        if (data && data.duplicate) problems.push(file.name + ": already uploaded");
      } catch (e) {
        problems.push(file.name + " — " + errorText(e));
      }
    }
    uploadBtn.disabled = false;
    fileInput.value = "";
    kbStatus.textContent = problems.join("\n");
    kbStatus.classList.toggle("kb-error", problems.length > 0);
    loadDocs();
  }
  async function removeDoc(doc) {
    if (!confirm('Delete "' + doc.name + '" and its index?')) return;
    try {
      await SB.api("/api/knowledge/documents/" + encodeURIComponent(doc.id), { method: "DELETE" });
    } catch (e) {
      kbStatus.textContent = errorText(e);
    }
    loadDocs();
  }
  uploadBtn.addEventListener("click", upload);
  socket.on("knowledge_progress", (p) => {
    if (!p || !p.document_id) return;
    if (!rows[p.document_id] && p.status === "indexing") { loadDocs(); return; }
    if (p.status === "indexing") showProgress(p.document_id, "indexing", p.done, p.total);
    else {
      if (p.status === "failed" && p.error) {
        kbStatus.textContent = p.name + " — " + errorText(p.error);
        kbStatus.classList.add("kb-error");
      }
      loadDocs();
    }
  });
  socket.on("connect", loadDocs);
  loadDocs();

  // ---------- translate panel ----------
  const tr = SB.addPanel("translate-panel", "Translate");
  const text = el("textarea", "tr-text", null, { rows: 3, id: "tr-text", placeholder: "Text to translate" });
  text.setAttribute("aria-label", "Text to translate");
  const source = el("select", "tr-lang", null, { id: "tr-source" });
  source.setAttribute("aria-label", "From");
  const target = el("select", "tr-lang", null, { id: "tr-target" });
  target.setAttribute("aria-label", "To");
  const go = el("button", "primary", "Translate", { type: "button", id: "tr-go" });
  const output = el("div", "tr-output", null, { id: "tr-output" });
  output.setAttribute("aria-live", "polite");
  const trStatus = el("div", "tr-status");
  const langs = el("div", "tr-langs");
  langs.append(source, el("span", null, "→"), target, go);
  tr.append(text, langs, output, trStatus);
  source.append(el("option", null, "auto", { value: "" }));
  SB.api("/api/translate/languages").then((data) => {
    for (const l of (data && data.languages) || []) {
      source.append(el("option", null, l.name, { value: l.code }));
      target.append(el("option", null, l.name, { value: l.code }));
    }
    target.value = localStorage.getItem("switchboard.translate.target") || "fr";
  }).catch((e) => { trStatus.textContent = errorText(e); });

  let current = null;                          // request id in flight
  function endTranslation(note) {
    current = null;
    go.textContent = "Translate";
    trStatus.textContent = note || "";
  }
  go.addEventListener("click", () => {
    if (current) { socket.emit("translate_stop", { request_id: current }); return; }
    const payload = { text: text.value, target: target.value,
                      request_id: "tr-" + Date.now().toString(36) + Math.random().toString(36).slice(2, 8) };
    if (source.value) payload.source = source.value;
    localStorage.setItem("switchboard.translate.target", target.value);
    output.textContent = "";
    trStatus.textContent = "translating…";
    trStatus.classList.remove("kb-error");
    current = payload.request_id;
    go.textContent = "Stop";
    socket.emit("translate", payload);
  });
  socket.on("translation_delta", (d) => {
    if (d && d.request_id === current) output.textContent += d.content || "";
  });
  socket.on("translation_done", (d) => {
    if (!d || d.request_id !== current) return;
    output.textContent = d.text;
    endTranslation(d.finish_reason + (d.model ? " · " + d.model : ""));
  });
  socket.on("error", (d) => {                 // errors of our translation (by `scope`, docs/protocol.md)
    if (!d || (d.scope !== "translate" && d.scope !== "translate_stop") || !d.request_id || d.request_id !== current) return;
    endTranslation(errorText(d));
    trStatus.classList.add("kb-error");
  });
})();
