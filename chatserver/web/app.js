// chatserver's chat page: chat over /ws, history from /v1/sessions/{id}.
//
// A plain ES module: no build step, no third-party code, nothing fetched from
// anywhere but this server. Messages (the model's and the user's) are rendered
// by ./markdown.js into DOM nodes, never through innerHTML.
//
// Storage: localStorage keeps the current session id, the ids of the chats
// this browser made (there is no GET /v1/sessions listing yet; once there is,
// loadSessionList() is the one place to ask it) and the settings;
// sessionStorage keeps an API key, so it dies with the tab.
//
// Auth contract (what the page sends and expects; the server's side is
// chatserver/api/auth.py and chatserver/api/ws.py):
//   HTTP:      `Authorization: Bearer <key>` on every /v1 request; a missing or
//              wrong key is a 401 whose error code is "unauthorized".
//   WebSocket: browsers cannot set headers on a WebSocket, and a key in the URL
//              ends up in access logs, so the key travels in the first frame:
//                {"type": "auth", "id": "auth", "api_key": "<key>"}
//              sent on open, before any other frame. A server that requires a
//              key reads that frame before acting on anything else (?session_id
//              included); a missing or wrong key gets the error frame
//              {"type": "error", "id": "auth", "code": "unauthorized", ...}
//              and the socket is closed with code 4401. A server without keys
//              answers the frame with "unknown_type" and the page drops the key.
// The page only sends the auth frame once it holds a key, which it asks for
// only after a 401 or an "unauthorized" error, so servers without keys never
// see one.
//
// Overload contract: error frames "server_busy" and "rate_limited" may carry
// "retry_after" (seconds), as HTTP 503/429 answers carry a Retry-After header;
// the page waits that long (5 s without one) before it lets the user send again.

import { renderMarkdown } from "./markdown.js";

const KEYS = {
  session: "chatserver.session",
  sessions: "chatserver.sessions",
  settings: "chatserver.settings",
  apiKey: "chatserver.apiKey",
};
const BACKOFF_FIRST_MS = 500;
const BACKOFF_MAX_MS = 5000;
const READY_POLL_MS = 1000;
const DEFAULT_RETRY_S = 5;
const MAX_SESSIONS = 50;
const CLOSE_UNAUTHORIZED = 4401;

const $ = (id) => document.getElementById(id);
const ui = {
  conn: $("conn"),
  model: $("model"),
  banner: $("banner"),
  bannerText: $("banner-text"),
  bannerAction: $("banner-action"),
  messages: $("messages"),
  empty: $("empty"),
  composer: $("composer"),
  prompt: $("prompt"),
  send: $("send"),
  stop: $("stop"),
  sessions: $("sessions"),
  noSessions: $("no-sessions"),
  newChat: $("new-chat"),
  menu: $("menu-toggle"),
  sidebar: $("sidebar"),
  temperature: $("temperature"),
  maxTokens: $("max-tokens"),
  forgetKey: $("forget-key"),
  keyDialog: $("key-dialog"),
  keyForm: $("key-form"),
  keyMessage: $("key-message"),
  keyInput: $("key-input"),
};

const state = {
  sessionId: localStorage.getItem(KEYS.session),
  socket: null,
  link: "connecting", // connecting | open | reconnecting | unauthorized
  attempt: 0, // reconnect attempts since the last open socket
  reconnectAt: 0,
  reconnectTimer: 0,
  ready: false, // the model answers (/readyz 200)
  readyTimer: 0,
  running: null, // the reply being streamed: {id, user, article, body, meta, text, tSend, tFirst, stopping}
  busyUntil: 0, // Date.now() before which the server asked us not to send
  busyText: "",
  pendingTitle: null, // the first message of a chat the server has not named yet
  counter: 0,
  needsKey: false,
  renderQueued: false,
};

// ---- storage ---------------------------------------------------------------

function readJSON(storage, key, fallback) {
  try {
    const value = JSON.parse(storage.getItem(key));
    return value ?? fallback;
  } catch {
    return fallback;
  }
}

/** The chats this browser made, newest first (until the server can list them). */
function loadSessionList() {
  const list = readJSON(localStorage, KEYS.sessions, []);
  return Array.isArray(list) ? list.filter((s) => s && typeof s.id === "string") : [];
}

function saveSessionList(list) {
  list.sort((a, b) => (b.updated || 0) - (a.updated || 0));
  localStorage.setItem(KEYS.sessions, JSON.stringify(list.slice(0, MAX_SESSIONS)));
  renderSessions();
}

function rememberSession(id, title) {
  const list = loadSessionList();
  let entry = list.find((s) => s.id === id);
  if (!entry) {
    entry = { id, title: "" };
    list.push(entry);
  }
  if (title && !entry.title) entry.title = title;
  entry.updated = Date.now();
  saveSessionList(list);
}

function forgetSession(id) {
  saveSessionList(loadSessionList().filter((s) => s.id !== id));
  if (state.sessionId === id) setSession(null);
}

function setSession(id) {
  state.sessionId = id;
  if (id) localStorage.setItem(KEYS.session, id);
  else localStorage.removeItem(KEYS.session);
  renderSessions();
}

function titleOf(text) {
  const line = text.trim().split("\n")[0];
  return line.length > 48 ? `${line.slice(0, 47)}…` : line;
}

function apiKey() {
  return sessionStorage.getItem(KEYS.apiKey);
}

// ---- settings --------------------------------------------------------------

function loadSettings() {
  const saved = readJSON(localStorage, KEYS.settings, {});
  ui.temperature.value = saved.temperature ?? "";
  ui.maxTokens.value = saved.max_tokens ?? "";
}

function saveSettings() {
  localStorage.setItem(
    KEYS.settings,
    JSON.stringify({ temperature: ui.temperature.value, max_tokens: ui.maxTokens.value }),
  );
}

/** Sampling params for a chat frame: only the fields set and valid. */
function params() {
  const out = {};
  if (ui.temperature.value !== "" && ui.temperature.checkValidity()) {
    out.temperature = Number(ui.temperature.value);
  }
  if (ui.maxTokens.value !== "" && ui.maxTokens.checkValidity()) {
    out.max_tokens = Number(ui.maxTokens.value);
  }
  return out;
}

// ---- HTTP ------------------------------------------------------------------

class Unauthorized extends Error {}

/** fetch() with the API key, if any; a 401 asks for a key and throws. */
async function api(path, options = {}) {
  const headers = new Headers(options.headers);
  const key = apiKey();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  const res = await fetch(path, { ...options, headers, cache: "no-store" });
  if (res.status === 401) {
    const body = await res.json().catch(() => ({}));
    askForKey(body?.error?.message);
    throw new Unauthorized();
  }
  return res;
}

async function errorText(res) {
  const body = await res.json().catch(() => ({}));
  const err = body?.error || {};
  const retry = res.headers.get("Retry-After");
  const text = `${err.message || res.statusText} (${err.code || res.status})`;
  return retry ? `${text}; try again in ${retry} s` : text;
}

/** Is the model loaded? Polls /readyz until it is. */
async function checkReady() {
  clearTimeout(state.readyTimer);
  let res;
  try {
    res = await fetch("/readyz", { cache: "no-store" });
  } catch {
    return; // the server is gone; the socket's reconnect loop takes over
  }
  const body = await res.json().catch(() => ({}));
  if (body.model) ui.model.textContent = body.model;
  state.ready = res.ok;
  clearTimeout(state.readyTimer); // another check may have run meanwhile
  if (!res.ok) state.readyTimer = setTimeout(checkReady, READY_POLL_MS);
  render();
}

async function loadHistory(id) {
  // Messages on the page now are another chat's (or none); ones sent while the
  // history loads are newer than it and stay below it.
  const stale = [...ui.messages.querySelectorAll(".msg")];
  let res;
  try {
    res = await api(`/v1/sessions/${encodeURIComponent(id)}`);
  } catch (err) {
    if (!(err instanceof Unauthorized)) showBanner("Could not load this chat: the server is not answering.");
    return;
  }
  if (id !== state.sessionId) return; // the user moved on meanwhile
  if (res.status === 404) {
    chatGone(id);
    return;
  }
  if (!res.ok) {
    showBanner(`Could not load this chat: ${await errorText(res)}`);
    return;
  }
  const body = await res.json();
  if (id !== state.sessionId) return;
  for (const node of stale) node.remove();
  const newer = ui.messages.querySelector(".msg");
  for (const m of body.messages || []) {
    if (m.role !== "user" && m.role !== "assistant") continue;
    const msg = appendMessage(m.role, m.content, "done", newer);
    if (m.cancelled) markStopped(msg);
  }
  const first = (body.messages || []).find((m) => m.role === "user");
  rememberSession(id, first ? titleOf(first.content) : "");
  scrollToEnd(true);
}

async function deleteSession(id) {
  let res;
  try {
    res = await api(`/v1/sessions/${encodeURIComponent(id)}`, { method: "DELETE" });
  } catch (err) {
    if (!(err instanceof Unauthorized)) showBanner("Could not delete the chat: the server is not answering.");
    return;
  }
  if (!res.ok && res.status !== 404) {
    showBanner(`Could not delete the chat: ${await errorText(res)}`);
    return;
  }
  const wasCurrent = id === state.sessionId;
  forgetSession(id);
  announce("Chat deleted.");
  if (wasCurrent) newChat();
  else ui.newChat.focus();
}

// ---- WebSocket -------------------------------------------------------------

function connect() {
  clearTimeout(state.reconnectTimer);
  const old = state.socket;
  state.socket = null; // its events are ignored from now on
  if (old) old.close(1000);
  const url = new URL("/ws", location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  if (state.sessionId) url.searchParams.set("session_id", state.sessionId); // resume
  const ws = new WebSocket(url);
  state.socket = ws;
  state.link = state.attempt ? "reconnecting" : "connecting";
  state.reconnectAt = 0;
  ws.addEventListener("open", () => {
    if (ws !== state.socket) return;
    const key = apiKey();
    if (key) ws.send(JSON.stringify({ type: "auth", id: "auth", api_key: key }));
    state.link = "open";
    state.attempt = 0;
    checkReady();
    render();
  });
  ws.addEventListener("message", (event) => {
    if (ws !== state.socket) return;
    let frame;
    try {
      frame = JSON.parse(event.data);
    } catch {
      return;
    }
    onFrame(frame);
  });
  ws.addEventListener("close", (event) => {
    if (ws !== state.socket) return;
    state.socket = null;
    if (state.running) finishRunning("interrupted", null, "Connection lost: the reply was cut off.");
    if (event.code === CLOSE_UNAUTHORIZED) {
      state.link = "unauthorized";
      if (!state.needsKey) askForKey(); // else the error frame before the close asked already
      render();
      return;
    }
    scheduleReconnect();
  });
  render();
}

function scheduleReconnect() {
  const delay = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** state.attempt) * (0.75 + Math.random() / 2);
  state.attempt += 1;
  state.link = "reconnecting";
  state.ready = false;
  state.reconnectAt = Date.now() + delay;
  state.reconnectTimer = setTimeout(connect, delay);
  render();
}

function sendFrame(frame) {
  if (state.socket?.readyState !== WebSocket.OPEN) return false;
  state.socket.send(JSON.stringify(frame));
  return true;
}

function onFrame(frame) {
  const r = state.running;
  switch (frame.type) {
    case "session":
      if (frame.session_id !== state.sessionId) setSession(frame.session_id);
      rememberSession(frame.session_id, state.pendingTitle);
      state.pendingTitle = null;
      break;
    case "token":
      if (!r || frame.id !== r.id) return;
      if (r.tFirst === null) r.tFirst = performance.now();
      r.text += frame.content;
      queueRender();
      break;
    case "done":
      if (!r || frame.id !== r.id) return;
      finishRunning(
        ["cancelled", "interrupted"].includes(frame.finish_reason) ? "stopped" : "done",
        frame,
      );
      break;
    case "error":
      onError(frame);
      break;
    default:
      break; // frames added later are ignored
  }
}

function onError(frame) {
  const { code, message } = frame;
  if (frame.id === "auth") {
    // unknown_type: this server takes no keys, so the key is dropped.
    if (code === "unknown_type") forgetKey();
    else if (code === "unauthorized") askForKey(message);
    return;
  }
  const r = state.running;
  const mine = r && (frame.id === r.id || frame.id === undefined);
  switch (code) {
    case "unauthorized":
      if (mine) failRunning("Not sent: an API key is needed.");
      askForKey(message);
      return;
    case "server_busy":
    case "rate_limited": {
      const seconds = retryAfter(frame);
      state.busyUntil = Date.now() + seconds * 1000;
      state.busyText =
        code === "server_busy" ? "The server is busy." : "You are sending too fast (rate limited).";
      const why = code === "server_busy" ? "the server is busy" : "rate limited";
      if (mine) failRunning(`Not answered: ${why}.`);
      render();
      return;
    }
    case "not_ready":
      state.ready = false;
      if (mine) failRunning("Not answered: the model is still loading.");
      checkReady();
      return;
    case "unknown_id":
    case "nothing_to_cancel":
      return; // a Stop that crossed the reply's end on the wire
    case "session_not_found":
      if (mine) failRunning("Not answered: this chat no longer exists on the server.");
      if (state.sessionId) chatGone(state.sessionId);
      return;
    default:
      if (mine) {
        if (r.text) finishRunning("error", null, `Error: ${message} (${code})`);
        else failRunning(`Not answered: ${message} (${code})`);
      } else {
        showBanner(`${message} (${code})`);
      }
  }
}

function retryAfter(frame) {
  const seconds = Number(frame.retry_after);
  return Number.isFinite(seconds) && seconds > 0 ? seconds : DEFAULT_RETRY_S;
}

function chatGone(id) {
  const wasCurrent = id === state.sessionId;
  forgetSession(id);
  if (!wasCurrent) return;
  showBanner(
    "This chat no longer exists on the server (it expired or was deleted). Your next message starts a new chat.",
  );
  // The socket may still hold the old session; a fresh one starts clean.
  if (state.socket) connect();
}

// ---- sending and streaming -------------------------------------------------

function canSend() {
  return (
    state.link === "open" && state.ready && !state.running && !state.needsKey && Date.now() >= state.busyUntil
  );
}

function sendMessage() {
  const text = ui.prompt.value;
  if (!text.trim() || !canSend()) return;
  state.counter += 1;
  const id = `w${state.counter}-${Date.now().toString(36)}`;
  const frame = { type: "chat", id, content: text, params: params() };
  if (state.sessionId) frame.session_id = state.sessionId;
  else state.pendingTitle = titleOf(text);
  if (!sendFrame(frame)) return;
  hideBanner();
  const user = appendMessage("user", text);
  const reply = appendMessage("assistant", "", "streaming");
  reply.article.setAttribute("aria-busy", "true");
  state.running = { id, user, ...reply, text: "", tSend: performance.now(), tFirst: null, stopping: false };
  ui.prompt.value = "";
  fitPrompt();
  scrollToEnd(true);
  render();
}

function stopReply() {
  const r = state.running;
  if (!r || r.stopping) return;
  if (sendFrame({ type: "cancel", id: r.id })) {
    r.stopping = true;
    render();
  }
}

function queueRender() {
  if (state.renderQueued) return;
  state.renderQueued = true;
  requestAnimationFrame(() => {
    state.renderQueued = false;
    const r = state.running;
    if (!r) return;
    const stick = nearEnd();
    renderMarkdown(r.text, r.body);
    if (stick) scrollToEnd(true);
  });
}

/** The reply ended: `outcome` is done, stopped, interrupted or error. */
function finishRunning(outcome, done, note = "") {
  const r = state.running;
  if (!r) return;
  state.running = null;
  const stick = nearEnd();
  renderMarkdown(r.text, r.body);
  r.article.removeAttribute("aria-busy");
  r.article.dataset.state = outcome;
  const parts = [];
  if (done?.usage) {
    const tDone = performance.now();
    const n = done.usage.completion_tokens;
    if (r.tFirst !== null) parts.push(`TTFT ${Math.round(r.tFirst - r.tSend)} ms`);
    // Decode speed: tokens after the first over the time after the first.
    if (n > 1 && r.tFirst !== null && tDone > r.tFirst) {
      parts.push(`${((n - 1) / ((tDone - r.tFirst) / 1000)).toFixed(1)} tok/s`);
    }
    parts.push(`${n} token${n === 1 ? "" : "s"}`);
    if (done.finish_reason === "length") parts.push("max tokens reached");
  }
  const meta = [];
  if (outcome === "stopped") meta.push(label("Stopped", "flag"));
  if (note) meta.push(label(note, "flag"));
  if (parts.length) meta.push(label(parts.join(" · "), "metrics"));
  r.meta.replaceChildren(...meta);
  if (stick) scrollToEnd(true);
  announce(outcome === "done" ? "Reply finished." : outcome === "stopped" ? "Reply stopped." : note);
  render();
}

/** The message was refused before any reply: say why, give the text back. */
function failRunning(reason) {
  const r = state.running;
  if (!r) return;
  state.running = null;
  r.article.remove();
  r.user.article.dataset.state = "failed";
  r.user.meta.replaceChildren(label(reason, "flag"));
  if (!ui.prompt.value) {
    ui.prompt.value = r.user.text;
    fitPrompt();
  }
  announce(reason);
  render();
}

function markStopped(msg) {
  msg.article.dataset.state = "stopped";
  msg.meta.replaceChildren(label("Stopped", "flag"));
}

// ---- rendering -------------------------------------------------------------

function label(text, className) {
  const span = document.createElement("span");
  span.className = className;
  span.textContent = text;
  return span;
}

function appendMessage(role, text, msgState = "done", before = null) {
  ui.empty.hidden = true;
  const article = document.createElement("article");
  article.className = `msg ${role}`;
  article.dataset.state = msgState;
  const who = label(role === "user" ? "You" : "Assistant", "who");
  const body = document.createElement("div");
  body.className = "body";
  renderMarkdown(text, body);
  const meta = document.createElement("div");
  meta.className = "meta";
  article.append(who, body, meta);
  ui.messages.insertBefore(article, before);
  return { article, body, meta, text };
}

function clearMessages() {
  for (const node of ui.messages.querySelectorAll(".msg")) node.remove();
  ui.empty.hidden = false;
}

function nearEnd() {
  const m = ui.messages;
  return m.scrollHeight - m.scrollTop - m.clientHeight < 80;
}

function scrollToEnd(force) {
  if (force || nearEnd()) ui.messages.scrollTop = ui.messages.scrollHeight;
}

function showBanner(text, action = null) {
  ui.bannerText.textContent = text;
  ui.bannerAction.hidden = !action;
  if (action) {
    ui.bannerAction.textContent = action.label;
    ui.bannerAction.onclick = action.run;
  }
  ui.banner.hidden = false;
}

function hideBanner() {
  ui.banner.hidden = true;
}

let announceTimer = 0;
/** A short message for screen readers (the status line is a live region too). */
function announce(text) {
  if (!text) return;
  const live = $("announcer");
  clearTimeout(announceTimer);
  live.textContent = text;
  announceTimer = setTimeout(() => {
    live.textContent = "";
  }, 4000);
}

function renderSessions() {
  const list = loadSessionList();
  ui.noSessions.hidden = list.length > 0;
  const items = list.map((s) => {
    const li = document.createElement("li");
    const open = document.createElement("button");
    open.type = "button";
    open.className = "session-open";
    open.textContent = s.title || "Untitled chat";
    open.title = s.title || s.id;
    if (s.id === state.sessionId) open.setAttribute("aria-current", "page");
    open.addEventListener("click", () => switchTo(s.id));
    const del = document.createElement("button");
    del.type = "button";
    del.className = "session-delete ghost";
    del.textContent = "Delete";
    del.setAttribute("aria-label", `Delete chat: ${s.title || "untitled"}`);
    del.addEventListener("click", () => deleteSession(s.id));
    li.append(open, del);
    return li;
  });
  ui.sessions.replaceChildren(...items);
}

/** Connection pill, composer buttons and the busy countdown, from `state`. */
function render() {
  let connState = state.link;
  let text;
  if (state.link === "open") {
    connState = state.ready ? "ready" : "loading";
    text = state.ready ? "Connected" : "Model loading…";
  } else if (state.link === "reconnecting") {
    const wait = Math.ceil((state.reconnectAt - Date.now()) / 1000);
    text = state.reconnectAt && wait > 0 ? `Reconnecting in ${wait} s…` : "Reconnecting…";
  } else if (state.link === "unauthorized") {
    text = "API key needed";
  } else {
    text = "Connecting…";
  }
  if (state.needsKey) connState = "unauthorized";
  if (ui.conn.dataset.state !== connState) ui.conn.dataset.state = connState;
  if (ui.conn.textContent !== text) ui.conn.textContent = text;

  const busyLeft = Math.ceil((state.busyUntil - Date.now()) / 1000);
  if (busyLeft > 0) {
    showBanner(`${state.busyText} You can send again in ${busyLeft} s.`);
    ui.banner.dataset.kind = "busy";
  } else if (ui.banner.dataset.kind === "busy") {
    ui.banner.dataset.kind = "";
    hideBanner();
  }

  const running = Boolean(state.running);
  ui.send.hidden = running;
  ui.stop.hidden = !running;
  ui.stop.disabled = running && state.running.stopping;
  ui.stop.textContent = running && state.running.stopping ? "Stopping…" : "Stop";
  ui.send.disabled = !canSend();
  ui.forgetKey.hidden = !apiKey();
}

// ---- API key ---------------------------------------------------------------

function askForKey(message) {
  state.needsKey = true;
  ui.keyMessage.textContent = message || "This server asks for an API key.";
  showBanner("This server needs an API key.", { label: "Enter key", run: () => askForKey(message) });
  if (!ui.keyDialog.open) {
    ui.keyInput.value = "";
    ui.keyDialog.returnValue = ""; // Escape must not reuse the last "save"
    ui.keyDialog.showModal();
  }
  render();
}

function forgetKey() {
  sessionStorage.removeItem(KEYS.apiKey);
  render();
}

ui.keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  ui.keyDialog.close("save");
});
$("key-cancel").addEventListener("click", () => ui.keyDialog.close("cancel"));
ui.keyDialog.addEventListener("close", () => {
  if (ui.keyDialog.returnValue !== "save" || !ui.keyInput.value) return;
  sessionStorage.setItem(KEYS.apiKey, ui.keyInput.value);
  state.needsKey = false;
  hideBanner();
  state.attempt = 0;
  connect();
  if (state.sessionId && !ui.messages.querySelector(".msg")) loadHistory(state.sessionId);
});

// ---- chats -----------------------------------------------------------------

function newChat() {
  if (state.running) finishRunning("stopped");
  setSession(null);
  clearMessages();
  hideBanner();
  state.pendingTitle = null;
  connect(); // a socket without a session: the next message starts one
  closeSidebar();
  ui.prompt.focus();
}

function switchTo(id) {
  if (id === state.sessionId) {
    closeSidebar();
    return;
  }
  if (state.running) finishRunning("stopped");
  setSession(id);
  clearMessages();
  hideBanner();
  connect();
  loadHistory(id);
  closeSidebar();
  ui.prompt.focus();
}

function closeSidebar() {
  if (ui.sidebar.dataset.open !== "true") return;
  ui.sidebar.dataset.open = "false";
  ui.menu.setAttribute("aria-expanded", "false");
}

// ---- events ----------------------------------------------------------------

function fitPrompt() {
  ui.prompt.style.height = "auto";
  ui.prompt.style.height = `${Math.min(ui.prompt.scrollHeight, 200)}px`;
}

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  sendMessage();
});
ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    sendMessage();
  } else if (event.key === "Escape" && state.running) {
    event.preventDefault();
    stopReply();
  }
});
ui.prompt.addEventListener("input", fitPrompt);
ui.stop.addEventListener("click", stopReply);
ui.newChat.addEventListener("click", newChat);
ui.forgetKey.addEventListener("click", () => {
  forgetKey();
  announce("API key forgotten.");
});
ui.temperature.addEventListener("input", saveSettings);
ui.maxTokens.addEventListener("input", saveSettings);
ui.menu.addEventListener("click", () => {
  const open = ui.sidebar.dataset.open !== "true";
  ui.sidebar.dataset.open = String(open);
  ui.menu.setAttribute("aria-expanded", String(open));
  if (open) ui.newChat.focus();
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && ui.sidebar.dataset.open === "true") {
    closeSidebar();
    ui.menu.focus();
  }
});
window.addEventListener("online", () => {
  if (state.link === "reconnecting") {
    state.attempt = 0;
    connect();
  }
});
window.addEventListener("storage", (event) => {
  if (event.key === KEYS.sessions) renderSessions(); // another tab made a chat
});
setInterval(() => {
  if (state.link === "reconnecting" || state.busyUntil) render();
  if (state.busyUntil && Date.now() >= state.busyUntil) state.busyUntil = 0;
}, 250);

// ---- start -----------------------------------------------------------------

loadSettings();
renderSessions();
checkReady();
if (state.sessionId) loadHistory(state.sessionId);
connect();
