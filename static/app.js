/* Switchboard chat page — vanilla JS, no build step.
 * Talks to the server over Socket.IO plus a few REST routes (see docs/protocol.md).
 * window.Switchboard lets later features add panels to <aside id="panels"> and
 * listen to socket events without touching this file. */
(function () {
  "use strict";

  const { el, formatTime, errorText } = window.SwitchboardUI;   // static/ui.js, loaded first
  const $ = (sel) => document.querySelector(sel);

  const MODEL_KEY = "switchboard.model";
  const BADGES = ["cancelled", "incomplete", "error"];
  const modelNames = {};    // model id -> display name, filled from the `models` payload
  const state = {
    chatId: null,           // chat shown in the conversation; null = a new, unsaved chat
    stream: null,           // the answer being streamed: {chatId, messageId, text, bubble, started}
    chats: [],
  };
  const ui = {
    conn: $("#conn-status"), modelSelect: $("#model-select"), refresh: $("#refresh-models"),
    chatList: $("#chat-list"), newChat: $("#new-chat"), title: $("#chat-title"),
    messages: $("#messages"), form: $("#composer"), prompt: $("#prompt"),
    send: $("#send"), stop: $("#stop"), reset: $("#reset"), panels: $("#panels"),
  };

  // ---------- access token (--api-token): asked once, kept in sessionStorage for this session ----------
  const TOKEN_KEY = "switchboard.token";
  const tokenUi = { dialog: $("#token-dialog"), form: $("#token-form"), input: $("#token-input"), message: $("#token-message") };
  const getToken = () => sessionStorage.getItem(TOKEN_KEY) || "";
  const authHeaders = () => (getToken() ? { Authorization: "Bearer " + getToken() } : {});
  let tokenTyped = false;                    // a refusal after the user typed a token means it was wrong
  function askToken() {                      // on a 401 or a refused socket; idempotent
    sessionStorage.removeItem(TOKEN_KEY);
    tokenUi.message.textContent = tokenTyped ? "That token was not accepted; try again."
                                             : "This server needs an access token.";
    if (!tokenUi.dialog.open) { tokenUi.input.value = ""; tokenUi.dialog.showModal(); }
  }

  // ---------- REST ----------
  async function api(path, options) {
    const opts = Object.assign({}, options);
    opts.headers = Object.assign({ Accept: "application/json" }, authHeaders(), opts.headers);
    const res = await fetch(path, opts);
    let body = null;
    try { body = await res.json(); } catch (e) { /* not JSON */ }
    if (res.status === 401) askToken();
    if (!res.ok) {
      const info = (body && body.error) || {};
      const err = new Error(info.message || res.statusText || "request failed");
      err.code = info.code || "http_" + res.status;
      throw err;
    }
    return body;
  }
  const postJSON = (path, body) => api(path, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });

  // ---------- markdown: always sanitised; message HTML is never injected raw ----------
  // Model output may not restyle the page or make the browser fetch anything (tracking,
  // data leaks): no <style>/<form>/style="", and only inline data: images keep their source.
  const PURIFY = { FORBID_TAGS: ["style", "form"], FORBID_ATTR: ["style"] };
  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A" && node.hasAttribute("href")) {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer");
    }
    for (const attr of ["src", "srcset", "poster"]) {
      const value = node.getAttribute(attr);
      if (value === null || (attr === "src" && /^data:image\//i.test(value))) continue;
      node.removeAttribute(attr);
      node.classList.add("blocked-media");
      node.title = "not loaded";
    }
  });
  function renderMarkdown(target, text) {
    target.innerHTML = DOMPurify.sanitize(marked.parse(text || "", { gfm: true, breaks: true }), PURIFY);
  }

  // ---------- conversation rendering ----------
  const nearBottom = () => ui.messages.scrollHeight - ui.messages.scrollTop - ui.messages.clientHeight < 60;
  const scrollDown = () => { ui.messages.scrollTop = ui.messages.scrollHeight; };
  function append(node) {
    const stick = nearBottom();
    ui.messages.appendChild(node);
    if (stick) scrollDown();
    return node;
  }

  function messageNode(role, content, opts) {
    opts = opts || {};
    const node = el("div", "message " + role);
    if (opts.id) node.dataset.messageId = opts.id;
    if (opts.inContext === false) node.classList.add("out-of-context");
    const label = role === "user" ? "You" : role === "assistant" ? modelNames[opts.model] || opts.model || "Assistant" : role;
    const body = el("div", "content");
    if (role === "assistant") renderMarkdown(body, content);
    else body.textContent = content;          // user/system text is shown as plain text
    node.append(el("div", "role", label));
    if (role === "assistant" && opts.reasoning) node.append(reasoningNode(opts.reasoning));
    node.append(body);
    if (opts.status) setBadge(node, opts.status);
    return node;
  }
  function reasoningNode(text) {             // the model's thinking: collapsed, plain text (never HTML)
    const box = el("details", "reasoning");
    box.append(el("summary", null, "Reasoning"), el("div", "reasoning-text", text));   // .reasoning-text keeps line breaks
    return box;
  }
  function setBadge(node, status) {
    if (!BADGES.includes(status) || node.querySelector(".badge")) return;
    node.querySelector(".role").appendChild(el("span", "badge badge-" + status, status));
  }
  function metaText(m) {
    const parts = [];
    if (m.finish_reason) parts.push(m.finish_reason);
    const n = m.completion_tokens;
    if (typeof n === "number") parts.push(n + (n === 1 ? " token" : " tokens"));
    if (typeof m.tokens_per_s === "number") parts.push(m.tokens_per_s.toFixed(1) + " tok/s");
    if (typeof m.ttft_ms === "number") parts.push("ttft " + Math.round(m.ttft_ms) + " ms");
    return parts.join(" · ");
  }
  const divider = () => el("div", "divider", "context cleared");

  function showError(err) {                  // inline, in the conversation; text is "code: message"
    const node = el("div", "error", errorText(err));
    node.setAttribute("role", "alert");
    append(node);
    scrollDown();
  }
  // One status line under the conversation ("sending…", "waiting — position 2").
  function setStreamStatus(text) {
    let line = ui.messages.querySelector(".stream-status");
    if (!text) { if (line) line.remove(); return; }
    if (!line) { line = el("div", "stream-status"); line.setAttribute("aria-live", "polite"); }
    line.textContent = text;
    append(line);                             // (re)moves it to the end
  }

  function renderHistory(data) {
    const msgs = (data && data.messages) || [];
    const s = state.stream;
    const lastOut = msgs.map((m) => m.in_context).lastIndexOf(false);
    historyHooks.forEach((hook) => hook(msgs));   // e.g. knowledge.js picks up stored citations
    ui.messages.replaceChildren();
    msgs.forEach((m, i) => {
      if (!(s && s.messageId === m.id)) {     // the live bubble stands in for a streaming answer
        const node = messageNode(m.role, m.content, { id: m.id, status: m.status, inContext: m.in_context, model: m.model, reasoning: m.reasoning });
        if (m.role === "assistant" && m.finish_reason) node.appendChild(el("div", "meta", metaText(m)));
        ui.messages.appendChild(node);
        if (m.role === "assistant" && m.status === "streaming" && i === msgs.length - 1 && !s) resumeStream(m, node);
      }
      if (i === lastOut) ui.messages.appendChild(divider());
    });
    if (s && s.bubble && s.chatId === state.chatId) ui.messages.appendChild(s.bubble);
    ui.title.textContent = (data && data.chat && data.chat.title) || "Untitled chat";
    scrollDown();
  }

  // An answer still being generated (the page was reloaded, or the connection came back): join it.
  // The server answers `joined` with the text so far, then sends its live events to this page too.
  function resumeStream(m, node) {
    node.classList.add("streaming");
    state.stream = { chatId: state.chatId, messageId: m.id, text: m.content || "", bubble: node,
                     started: true, joining: true, nextIndex: 0 };
    updateControls();
    socket.emit("join", { chat_id: state.chatId });
  }

  // ---------- controls ----------
  function updateControls() {
    const streaming = !!state.stream;
    ui.send.disabled = streaming;
    ui.stop.disabled = !streaming;
    ui.reset.disabled = streaming || !state.chatId;
  }
  function autosize() {
    ui.prompt.style.height = "auto";
    ui.prompt.style.height = Math.min(ui.prompt.scrollHeight, 240) + "px";
  }

  // ---------- chats ----------
  async function loadChats() {
    try {
      const data = await api("/api/chats");
      state.chats = (data && data.chats) || [];
      renderChatList();
      const current = state.chats.find((c) => c.id === state.chatId);
      if (current) ui.title.textContent = current.title || "Untitled chat";
    } catch (e) {
      console.warn("could not load chats:", e);
    }
  }
  function renderChatList() {
    ui.chatList.replaceChildren();
    for (const c of state.chats) {
      const title = c.title || "Untitled chat";
      const item = el("li", "chat-item" + (c.id === state.chatId ? " active" : ""));
      item.dataset.chatId = c.id;
      const open = el("button", "chat-open", null, { type: "button" });
      const count = c.message_count === undefined ? "" : " · " + c.message_count + " msg";
      open.append(el("span", "chat-name", title), el("span", "chat-sub", formatTime(c.updated_at || c.created_at) + count));
      const del = el("button", "chat-delete", "×", { type: "button", title: "Delete chat" });
      del.setAttribute("aria-label", "Delete chat " + title);
      del.addEventListener("click", (e) => { e.stopPropagation(); deleteChat(c.id, title); });
      item.addEventListener("click", () => openChat(c.id));
      item.append(open, del);
      ui.chatList.appendChild(item);
    }
  }
  async function openChat(id) {
    state.chatId = id;
    history.replaceState(null, "", "#" + encodeURIComponent(id));
    document.body.classList.remove("sidebar-open");
    renderChatList();
    updateControls();
    ui.messages.replaceChildren();
    try {
      const data = await api("/api/chats/" + encodeURIComponent(id));
      if (state.chatId === id) renderHistory(data);   // ignore if the user moved on
    } catch (e) {
      if (state.chatId === id) showError(e);
    }
  }
  function newChat() {
    state.chatId = null;
    history.replaceState(null, "", location.pathname + location.search);
    document.body.classList.remove("sidebar-open");
    ui.messages.replaceChildren();
    ui.title.textContent = "New chat";
    renderChatList();
    updateControls();
    ui.prompt.focus();
  }
  async function deleteChat(id, title) {
    if (!confirm('Delete "' + title + '"? This cannot be undone.')) return;
    try {
      await api("/api/chats/" + encodeURIComponent(id), { method: "DELETE" });
    } catch (e) {
      showError(e);
      return;
    }
    if (state.chatId === id) newChat();
    loadChats();
  }

  // ---------- models ----------
  function renderModels(payload) {
    const groups = (payload && payload.groups) || [];
    const saved = localStorage.getItem(MODEL_KEY);
    const current = ui.modelSelect.value;
    const enabled = [];
    ui.modelSelect.replaceChildren();
    for (const g of groups) {
      const groupOk = g.available !== false;
      const og = el("optgroup", null, null, {
        label: groupOk ? g.name : g.name + " — " + (g.reason || "unavailable"), disabled: !groupOk });
      og.dataset.group = g.key;
      for (const m of g.models || []) {
        const name = m.name || m.id;
        modelNames[m.id] = name;
        const ok = groupOk && m.available !== false;
        const reason = ok ? m.reason : m.reason || g.reason || "unavailable";   // available ones may note e.g. "preparing"
        og.appendChild(el("option", null, reason ? name + " — " + reason : name, { value: m.id, disabled: !ok }));
        if (ok) enabled.push(m.id);
      }
      if (!(g.models || []).length) {         // keep empty groups visible; the label carries the reason
        og.appendChild(el("option", null, "(no models)", { value: "", disabled: true }));
      }
      ui.modelSelect.appendChild(og);
    }
    const pick = [current, saved, payload && payload.default, enabled[0]].find((id) => id && enabled.includes(id));
    if (pick) {
      ui.modelSelect.value = pick;
    } else {
      ui.modelSelect.prepend(el("option", null, "No model available", { value: "", disabled: true }));
      ui.modelSelect.value = "";
    }
  }
  let refreshTimer = 0;
  function refreshModels() {
    ui.refresh.disabled = true;
    ui.refresh.classList.add("busy");
    socket.emit("list_models", {});
    clearTimeout(refreshTimer);
    refreshTimer = setTimeout(refreshDone, 60000);   // give up waiting, re-enable the button
  }
  function refreshDone() {
    clearTimeout(refreshTimer);
    ui.refresh.disabled = false;
    ui.refresh.classList.remove("busy");
  }

  // ---------- sending and streaming ----------
  const payloadHooks = [];                    // Switchboard.onChatPayload(fn): fn(payload) before a chat is sent
  const historyHooks = [];                    // Switchboard.onHistory(fn): fn(messages) before a chat is drawn
  function send() {
    const content = ui.prompt.value;
    if (!content.trim() || state.stream) return;
    const model = ui.modelSelect.value;
    if (!model) return showError({ code: "no_model", message: "Choose an available model first." });
    if (!socket.connected) return showError({ code: "disconnected", message: "Not connected to the server." });
    const payload = { model: model, content: content };
    if (state.chatId) payload.chat_id = state.chatId;
    payloadHooks.forEach((hook) => hook(payload));   // e.g. knowledge.js adds `knowledge: true`
    append(messageNode("user", content));
    scrollDown();
    ui.prompt.value = "";
    autosize();
    state.stream = { chatId: state.chatId, messageId: null, text: "", bubble: null, started: false };
    setStreamStatus("sending…");
    updateControls();
    socket.emit("chat", payload);
  }
  function paintStream(s) {
    const stick = nearBottom();
    renderMarkdown(s.bubble.querySelector(".content"), s.text);
    if (stick) scrollDown();
  }
  function scheduleRender(s) {               // at most one markdown render per frame
    if (s.frame) return;
    s.frame = requestAnimationFrame(() => { s.frame = 0; paintStream(s); });
  }
  function endStream() {
    const s = state.stream;
    if (!s) return;
    if (s.frame) cancelAnimationFrame(s.frame);
    if (s.bubble) { paintStream(s); s.bubble.classList.remove("streaming"); }
    state.stream = null;
    setStreamStatus(null);
    updateControls();
  }
  function stop() {
    const s = state.stream;
    if (!s) return;
    if (s.chatId && s.started) socket.emit("stop", { chat_id: s.chatId });
    else s.stopRequested = true;             // sent as soon as chat_started names the chat
    ui.stop.disabled = true;
  }

  // ---------- socket ----------
  const socket = io({ auth: (cb) => cb({ token: getToken() }) });
  const setConn = (text, key) => { ui.conn.textContent = text; ui.conn.dataset.state = key; };
  let everConnected = false;

  socket.on("connect", () => {
    setConn("connected", "connected");
    if (everConnected) {                     // after a reconnect, catch up with what we missed
      loadChats();
      if (state.chatId && !state.stream) openChat(state.chatId);
    }
    everConnected = true;
  });
  socket.on("disconnect", () => {
    setConn("disconnected", "disconnected");
    const s = state.stream;
    if (s) {                                 // the server keeps answering a while: on reconnect we join it again
      endStream();
      showError({ code: "disconnected", message: "Connection lost while answering; the answer is picked up again when the connection returns." });
    }
  });
  socket.io.on("reconnect_attempt", () => setConn("reconnecting…", "reconnecting"));
  socket.on("connect_error", (err) => {     // socket.active: the client will retry by itself
    if (err && err.message === "unauthorized") askToken();
    if (socket.active) setConn("reconnecting…", "reconnecting"); else setConn("disconnected", "disconnected");
  });

  socket.on("models", (payload) => { renderModels(payload); refreshDone(); });

  socket.on("chat_started", (d) => {
    const s = state.stream;
    if (!s || s.started || (s.chatId && s.chatId !== d.chat_id)) return;
    const viewing = state.chatId === s.chatId;
    Object.assign(s, { chatId: d.chat_id, messageId: d.message_id, started: true });
    s.bubble = messageNode("assistant", "", { id: d.message_id, model: d.model });
    s.bubble.classList.add("streaming");
    if (viewing) {
      state.chatId = d.chat_id;
      history.replaceState(null, "", "#" + encodeURIComponent(d.chat_id));
      append(s.bubble);
      setStreamStatus("thinking…");
    }
    if (s.stopRequested) socket.emit("stop", { chat_id: s.chatId });
    updateControls();
    loadChats();
  });
  socket.on("joined", (d) => {
    const s = state.stream;
    if (!s || !s.joining || s.chatId !== d.chat_id) return;
    s.joining = false;
    if (!d.streaming) {                      // it ended meanwhile: show it as stored
      const m = d.message || {};
      s.text = m.content || s.text;
      if (s.bubble && m.finish_reason) s.bubble.appendChild(el("div", "meta", metaText(m)));
      if (s.bubble && m.status) setBadge(s.bubble, m.status);
      endStream();
      loadChats();
      return;
    }
    Object.assign(s, { messageId: d.message_id, text: d.content || "", nextIndex: d.next_index || 0 });
    if (d.reasoning && s.bubble) {
      let box = s.bubble.querySelector(".reasoning");
      if (!box) box = s.bubble.insertBefore(reasoningNode(""), s.bubble.querySelector(".content"));
      box.querySelector(".reasoning-text").textContent = d.reasoning;
    }
    if (state.chatId === s.chatId) setStreamStatus(d.content ? null : "thinking…");
    scheduleRender(s);
  });
  // A model being freed, loaded or woken for our answer: said in the pending answer instead of "thinking…".
  const LOADING_TEXT = { freeing: "freeing memory", loading: "loading the model", waking: "waking the model",
                         waiting: "waiting for the other model's answers to finish" };
  socket.on("model_loading", (d) => {
    const s = state.stream;
    if (!s || d.chat_id !== s.chatId || state.chatId !== s.chatId || s.text) return;
    const eta = typeof d.eta_s === "number" ? " (~" + Math.max(1, Math.round(d.eta_s)) + " s)" : "";
    setStreamStatus((LOADING_TEXT[d.phase] || d.phase) + (d.release ? ": " + d.release : "") + eta + "…");
  });
  socket.on("queued", (d) => {
    const s = state.stream;
    if (s && (!s.chatId || s.chatId === d.chat_id) && state.chatId === s.chatId) {
      setStreamStatus("waiting — position " + d.position);
    }
  });
  socket.on("reasoning", (d) => {          // shown collapsed above the answer
    const s = state.stream;
    if (!s || !s.bubble || d.message_id !== s.messageId || s.joining || d.index < (s.nextIndex || 0)) return;
    let box = s.bubble.querySelector(".reasoning");
    if (!box) box = s.bubble.insertBefore(reasoningNode(""), s.bubble.querySelector(".content"));
    box.querySelector(".reasoning-text").textContent += d.content || "";
  });
  socket.on("delta", (d) => {
    const s = state.stream;
    if (!s || !s.bubble || (d.message_id !== s.messageId && d.chat_id !== s.chatId)) return;
    if (s.joining || d.index < (s.nextIndex || 0)) return;   // before `joined`: its text already holds it
    if (!s.text) setStreamStatus(null);
    s.text += d.content || "";
    scheduleRender(s);
  });
  socket.on("done", (d) => {
    const s = state.stream;
    if (s && s.bubble && (d.message_id === s.messageId || d.chat_id === s.chatId)) {
      const usage = d.usage || {}, timings = d.timings || {};
      s.bubble.appendChild(el("div", "meta", metaText({
        finish_reason: d.finish_reason, completion_tokens: usage.completion_tokens,
        tokens_per_s: timings.tokens_per_s, ttft_ms: timings.ttft_ms,
      })));
      if (d.finish_reason === "cancelled") setBadge(s.bubble, "cancelled");
      endStream();
    }
    loadChats();
  });
  // Every `error` says what it belongs to (`scope`, docs/protocol.md): this script shows the chat's and
  // the model list's; translation and download errors belong to their panels.
  const CHAT_SCOPES = ["chat", "stop", "reset", "list_models", "select_model"];
  socket.on("error", (d) => {
    d = d || {};
    if (!CHAT_SCOPES.includes(d.scope)) return;
    if (d.scope === "list_models") refreshDone();
    const s = state.stream;
    // Only a `chat` error can end our answer: after chat_started the one with its chat id; before it,
    // the refusal of our request (it names our chat, or no chat when we asked for a new one).
    const mine = d.scope === "chat" && !!s && (s.started ? d.chat_id === s.chatId || d.message_id === s.messageId
                                                         : !d.chat_id || d.chat_id === s.chatId);
    if (mine) {
      if (s.bubble) setBadge(s.bubble, "incomplete");
      endStream();
    }
    const elsewhere = d.scope === "chat" && !mine && d.chat_id && d.chat_id !== state.chatId;
    if (!elsewhere) showError(d);
    if (d.scope === "chat" && d.chat_id) loadChats();
  });
  socket.on("reset_ok", (d) => {
    if (d.chat_id !== state.chatId) return;
    ui.messages.querySelectorAll(".message").forEach((m) => m.classList.add("out-of-context"));
    append(divider());
  });

  // ---------- wiring ----------
  ui.form.addEventListener("submit", (e) => { e.preventDefault(); send(); });
  ui.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  ui.prompt.addEventListener("input", autosize);
  ui.stop.addEventListener("click", stop);
  ui.reset.addEventListener("click", () => {
    if (state.chatId && !state.stream) socket.emit("reset", { chat_id: state.chatId });
  });
  ui.newChat.addEventListener("click", newChat);
  ui.refresh.addEventListener("click", refreshModels);
  ui.modelSelect.addEventListener("change", () => {
    const model = ui.modelSelect.value;
    if (!model) return;
    localStorage.setItem(MODEL_KEY, model);
    socket.emit("select_model", { model: model });
  });
  $("#toggle-sidebar").addEventListener("click", () => document.body.classList.toggle("sidebar-open"));

  // ---------- extension points for later features ----------
  window.Switchboard = {
    socket: socket, state: state, api: api, postJSON: postJSON, renderMarkdown: renderMarkdown,
    openChat: openChat, newChat: newChat, loadChats: loadChats, refreshModels: refreshModels,
    setStreamStatus: setStreamStatus,
    /** Registers fn(payload), called with each chat payload before it is sent (may add fields). */
    onChatPayload(fn) { payloadHooks.push(fn); },
    /** Registers fn(messages), called with a chat's stored messages each time its history is drawn. */
    onHistory(fn) { historyHooks.push(fn); },
    /** Adds a titled panel to <aside id="panels"> and returns its body element. */
    addPanel(id, title) {
      const panel = el("section", "panel", null, { id: id });
      const body = el("div", "panel-body");
      panel.append(el("h2", "panel-title", title), body);
      ui.panels.appendChild(panel);
      ui.panels.hidden = false;
      document.body.classList.add("has-panels");
      return body;
    },
  };

  // ---------- start ----------
  tokenUi.dialog.addEventListener("cancel", (e) => e.preventDefault());   // no way around the question
  tokenUi.form.addEventListener("submit", () => {   // method=dialog: the dialog closes itself
    sessionStorage.setItem(TOKEN_KEY, tokenUi.input.value.trim());
    tokenTyped = true;
    api("/api/models").then(renderModels).catch((e) => e.code === "unauthorized" || showError(e));
    loadChats();
    if (state.chatId) openChat(state.chatId);
    if (!socket.connected) socket.connect();
  });
  api("/api/models").then(renderModels).catch((e) => e.code === "unauthorized" || showError(e));
  loadChats();
  updateControls();
  let startChat = "";                        // #<chat id> reopens that chat after a reload
  try { startChat = decodeURIComponent(location.hash.slice(1)); } catch (e) { /* malformed hash */ }
  if (startChat) openChat(startChat);
})();
