/*
 * Embeddable chat widget. One tag on the host page:
 *
 *   <script src="https://GATEWAY/widget.js" data-key="PUBLIC_KEY" async></script>
 *
 * Optional attributes: data-title, data-open="true", and for identity verification
 * data-visitor-id + data-signature (hex HMAC-SHA256 of the visitor id, computed server side by
 * the host; a chatbot without an identity secret takes only the widget's own random ids).
 * Plain JavaScript, no dependencies, no build step. Everything renders inside a Shadow
 * DOM; the only global is window.ChatWidget {open(), close(), toggle(), send(text), visitorId}.
 * The host page may set the CSS variable --chat-widget-accent (it inherits into the shadow root).
 */
(function () {
  "use strict";
  if (window.ChatWidget) return; // embedded twice: the first copy wins

  const script =
    document.currentScript ||
    document.querySelector('script[data-key][src*="widget.js"]') ||
    document.querySelector("script[data-key]");
  if (!script || !script.dataset.key) {
    console.warn("chat widget: no <script data-key> found; not starting");
    return;
  }
  const cfg = script.dataset;
  // The API lives next to widget.js (so a gateway mounted under a path prefix works too).
  const API = new URL(`v1/widget/${encodeURIComponent(cfg.key)}/`, new URL(".", script.src));
  const STORAGE_KEY = `chat-widget:${cfg.key}:visitor`;
  const MAX_TEXT = 4000;
  const REQUEST_TIMEOUT_MS = 15000;
  // Forward-only delivery statuses (chat_domain.DELIVERY_STATUS_RANK): late or duplicate events
  // never move a message backwards.
  const RANK = { received: 0, queued: 1, sent: 2, failed: 3, delivered: 4, read: 5 };
  const STATUS_LABEL = {
    sending: "Sending…",
    error: "Not sent. Tap to retry",
    received: "Sent",
    queued: "Sent",
    sent: "Sent",
    failed: "Not delivered",
    delivered: "Delivered",
    read: "Read",
  };
  const WHO = { user: "You", assistant: "Assistant", agent: "Agent", system: "Notice" };

  // ---- identity --------------------------------------------------------------------------
  const signature = cfg.signature || null;
  let visitorId = cfg.visitorId || storageGet(STORAGE_KEY);
  // A visitor who has chatted before (or is identified by the host) connects at once, to get
  // replies that arrived while away; anonymous first-time visitors connect on first open/send,
  // so a page view that never uses the chat costs the gateway nothing.
  const returning = Boolean(visitorId);
  if (!visitorId) visitorId = uuid();

  function storageGet(key) {
    try {
      return window.localStorage.getItem(key);
    } catch (e) {
      return null; // storage disabled (privacy mode, sandboxed iframe): an id per page view
    }
  }

  function uuid() {
    // crypto.randomUUID exists only in secure contexts; many shops still serve plain http.
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  }

  function apiUrl(path, params) {
    const u = new URL(path, API);
    u.searchParams.set("visitor_id", visitorId);
    // HTTP calls send the signature in a header (URLs end up in proxies' access logs); a
    // browser cannot set headers on a WebSocket, so the socket's URL carries it.
    if (signature && path === "ws") u.searchParams.set("signature", signature);
    for (const [k, v] of Object.entries(params || {})) u.searchParams.set(k, String(v));
    return u;
  }

  async function request(u, body) {
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), REQUEST_TIMEOUT_MS);
    const headers = body ? { "Content-Type": "application/json" } : {};
    if (signature) headers["X-Visitor-Signature"] = signature;
    try {
      const res = await fetch(u, {
        method: body ? "POST" : "GET",
        headers,
        body: body ? JSON.stringify(body) : undefined,
        credentials: "omit", // no cookies: the widget runs on other sites' pages
        cache: "no-store",
        signal: abort.signal,
      });
      const data = await res.json().catch(() => null);
      if (!res.ok) {
        const err = (data && data.error) || {};
        const e = new Error(err.message || `HTTP ${res.status}`);
        // an overloaded gateway (503) says when to come back; nothing was stored
        if (res.status === 503) {
          e.retryAfterMs = 1000 * (Number(res.headers.get("Retry-After")) || 1);
        }
        throw e;
      }
      return data || {};
    } finally {
      clearTimeout(timer);
    }
  }

  // ---- DOM (static markup only; message text is only ever set through textContent) --------
  const host = document.createElement("div");
  host.setAttribute("data-chat-widget", "");
  host.dataset.state = "idle";
  const root = host.attachShadow({ mode: "open" });
  root.innerHTML = `<style>
  :host { all: initial; }
  * { box-sizing: border-box; }
  .w { --accent: var(--chat-widget-accent, #2457d6); font: 15px/1.4 system-ui, -apple-system,
    "Segoe UI", Roboto, sans-serif; color: #1d2330; }
  .launcher { position: fixed; right: 20px; bottom: 20px; z-index: 2147483000; width: 56px;
    height: 56px; border: 0; border-radius: 50%; background: var(--accent); color: #fff;
    cursor: pointer; box-shadow: 0 4px 14px rgba(0,0,0,.25); display: grid; place-items: center; }
  .launcher svg { width: 28px; height: 28px; fill: currentColor; }
  .badge { position: absolute; top: -2px; right: -2px; min-width: 20px; height: 20px;
    padding: 0 5px; border-radius: 10px; background: #d92d20; font: 600 12px/20px system-ui; }
  .panel { position: fixed; right: 20px; bottom: 88px; z-index: 2147483001; width: 370px;
    height: min(600px, calc(100vh - 108px)); display: flex; flex-direction: column;
    background: #fff; border-radius: 14px; overflow: hidden; box-shadow: 0 8px 30px rgba(0,0,0,.25); }
  [hidden] { display: none !important; }
  header { display: flex; align-items: center; gap: 8px; padding: 12px 14px;
    background: var(--accent); color: #fff; }
  h2 { flex: 1; margin: 0; font-size: 16px; font-weight: 600; overflow: hidden;
    text-overflow: ellipsis; white-space: nowrap; }
  .close { border: 0; background: none; color: inherit; font-size: 24px; line-height: 1;
    cursor: pointer; padding: 2px 6px; border-radius: 6px; }
  ol { flex: 1; margin: 0; padding: 12px; list-style: none; overflow-y: auto;
    display: flex; flex-direction: column; gap: 8px; background: #f5f6f8; }
  .msg { max-width: 80%; align-self: flex-start; }
  .msg.mine { align-self: flex-end; text-align: right; }
  .msg.system { align-self: center; max-width: 90%; font-size: 13px; color: #5b6475; }
  .text { display: inline-block; text-align: left; padding: 8px 12px; border-radius: 14px;
    background: #fff; white-space: pre-wrap; overflow-wrap: anywhere; border: 1px solid #e3e6ea; }
  .mine .text { background: var(--accent); color: #fff; border-color: transparent; }
  .status { display: block; margin-left: auto; border: 0; background: none; padding: 2px 4px;
    font: 12px system-ui, sans-serif; color: #6b7385; }
  .error { cursor: pointer; }
  .error .status { color: #b42318; cursor: pointer; text-decoration: underline; }
  .error .text { opacity: .6; }
  .typing { padding: 4px 16px 8px; background: #f5f6f8; color: #6b7385; font-size: 13px; }
  .typing i { display: inline-block; width: 6px; height: 6px; margin-right: 3px; border-radius: 50%;
    background: currentColor; animation: b 1s infinite; }
  .typing i:nth-child(2) { animation-delay: .15s; } .typing i:nth-child(3) { animation-delay: .3s; }
  @keyframes b { 50% { opacity: .2; } }
  form { display: flex; gap: 8px; padding: 10px; border-top: 1px solid #e3e6ea; }
  textarea { flex: 1; resize: none; max-height: 120px; padding: 8px 10px; border: 1px solid #c9ced6;
    border-radius: 10px; font-family: inherit; font-size: 16px; line-height: 1.35; color: inherit; }
  .send { border: 0; border-radius: 10px; padding: 0 14px; background: var(--accent); color: #fff;
    font: 600 14px system-ui, sans-serif; cursor: pointer; }
  button:focus-visible, textarea:focus-visible { outline: 3px solid #f5b400; outline-offset: 1px; }
  .sr { position: absolute; width: 1px; height: 1px; overflow: hidden; clip: rect(0 0 0 0); }
  @media (max-width: 480px) {
    .panel { inset: 0; width: auto; height: auto; border-radius: 0; }
  }
  @media (prefers-reduced-motion: reduce) { .typing i { animation: none; } }
</style>
<div class="w">
  <button class="launcher" type="button" aria-label="Open chat" aria-expanded="false"
    aria-controls="panel">
    <svg viewBox="0 0 24 24" aria-hidden="true"><path d="M4 4h16a2 2 0 0 1 2 2v10a2 2 0 0 1-2 2H9l-5
      4v-4a2 2 0 0 1-2-2V6a2 2 0 0 1 2-2z"/></svg>
    <span class="badge" hidden></span>
  </button>
  <section class="panel" id="panel" role="dialog" aria-labelledby="title" hidden>
    <header><h2 id="title"></h2>
      <button class="close" type="button" aria-label="Close chat">×</button></header>
    <ol class="log" role="log" aria-live="polite" aria-label="Messages"></ol>
    <div class="typing" role="status" hidden><i></i><i></i><i></i>
      <span class="sr">The assistant is typing</span></div>
    <form class="composer">
      <textarea rows="1" maxlength="${MAX_TEXT}" aria-label="Message"
        placeholder="Type a message…"></textarea>
      <button class="send" type="submit">Send</button>
    </form>
  </section>
</div>`;
  const $ = (sel) => root.querySelector(sel);
  const launcher = $(".launcher");
  const badge = $(".badge");
  const panel = $(".panel");
  const list = $(".log");
  const typing = $(".typing");
  const form = $("form");
  const input = $("textarea");
  $("h2").textContent = cfg.title || "Chat";

  // ---- messages --------------------------------------------------------------------------
  // m = {id, clientId, seq, role, text, status (server), local ("sending" | "error" | null), el}
  const byId = new Map();
  const byClientId = new Map();
  const acked = new Set();
  let pendingAcks = [];
  // Every message up to `synced` has been seen: history is re-fetched `after` it on every
  // (re)connect. Socket messages advance it only when contiguous, because a message stored
  // between a history page and the socket's subscription would otherwise be skipped.
  let synced = 0;
  let conversationId = null;
  let generation = 0; // bumped when a new conversation resets `synced`
  let unread = 0;
  let typingTimer = 0;

  function nearBottom() {
    return list.scrollHeight - list.scrollTop - list.clientHeight < 80;
  }

  function render(m) {
    const li = document.createElement("li");
    li.className = `msg ${m.role === "user" ? "mine" : m.role === "system" ? "system" : "theirs"}`;
    li.dataset.role = m.role;
    const who = document.createElement("span");
    who.className = "sr";
    who.textContent = `${WHO[m.role] || m.role}: `;
    const text = document.createElement("div");
    text.className = "text";
    text.textContent = m.text;
    li.append(who, text);
    if (m.role === "user") {
      const status = document.createElement("button");
      status.type = "button";
      status.className = "status";
      status.disabled = true;
      li.append(status);
    }
    m.el = li;
    if (m.clientId) li.dataset.clientId = m.clientId;
    setSeq(m, m.seq);
    paint(m);
    // Keep server order: before the first shown message with a larger seq, else at the end
    // (optimistic messages have no seq yet and stay where they were put).
    const after = m.seq == null ? null : [...list.children].find((el) => +el.dataset.seq > m.seq);
    list.insertBefore(li, after || null);
  }

  function setSeq(m, seq) {
    if (typeof seq !== "number") return;
    m.seq = seq;
    m.el.dataset.seq = String(seq);
  }

  // A resolved conversation is followed by a new one whose seq starts again at 1: forget the old
  // cursor and order, and append from here on.
  function setConversation(id) {
    if (id == null || String(id) === conversationId) return;
    if (conversationId != null) {
      for (const el of list.children) delete el.dataset.seq;
      synced = 0;
      generation += 1;
      refresh();
    }
    conversationId = String(id);
  }

  function advance(m, status) {
    if (status in RANK && (!(m.status in RANK) || RANK[status] > RANK[m.status])) m.status = status;
  }

  function paint(m) {
    if (m.role !== "user" || !m.el) return;
    const state = m.local || m.status || "sending";
    const status = m.el.querySelector(".status");
    status.textContent = STATUS_LABEL[state] || "Sent";
    status.title = m.local === "error" ? m.error || "" : "";
    status.disabled = m.local !== "error"; // retry button only after a failed send
    m.el.classList.toggle("error", m.local === "error");
    m.el.dataset.status = state;
  }

  function bindId(m, id) {
    const other = byId.get(id);
    if (other && other !== m) {
      // The server's copy arrived (socket or history) before the POST answer and carried no
      // client_message_id to match it: keep one element, in the server copy's position.
      other.el.replaceWith(m.el);
      setSeq(m, other.seq);
      advance(m, other.status);
    }
    m.id = id;
    m.el.dataset.id = id;
    byId.set(id, m);
  }

  // A message from history or the socket: update the one we have, else show it.
  function receive(data, live) {
    if (!data || data.id == null) return;
    if (live && data.seq === synced + 1) synced = data.seq;
    const id = String(data.id);
    const m = byId.get(id) || (data.client_message_id && byClientId.get(data.client_message_id));
    if (m) {
      if (m.id !== id) bindId(m, id);
      setSeq(m, data.seq);
      m.local = null; // the server has it, whatever happened to our POST
      advance(m, data.status);
      paint(m);
      return;
    }
    const stick = nearBottom();
    const fresh = {
      id,
      clientId: data.client_message_id || null,
      seq: typeof data.seq === "number" ? data.seq : null,
      role: data.role || "assistant",
      text: String(data.text == null ? "" : data.text),
      status: data.status,
      local: null,
    };
    byId.set(id, fresh);
    if (fresh.clientId) byClientId.set(fresh.clientId, fresh);
    render(fresh);
    fresh.el.dataset.id = id;
    if (fresh.role !== "user") {
      setTyping(false);
      if (!(RANK[fresh.status] >= RANK.delivered)) {
        if (panel.hidden) unread += 1;
        ack(fresh);
      }
      paintBadge();
    }
    if (stick) list.scrollTop = list.scrollHeight;
  }

  function ack(m) {
    if (acked.has(m.id)) return;
    acked.add(m.id);
    pendingAcks.push(m.id);
    flushAcks();
  }

  function flushAcks() {
    if (!ws || ws.readyState !== WebSocket.OPEN) return; // sent on the next open
    for (const id of pendingAcks) ws.send(JSON.stringify({ type: "ack", message_id: id }));
    pendingAcks = [];
  }

  function send(text) {
    text = String(text == null ? "" : text).trim();
    if (!text) return null;
    start();
    const m = { id: null, clientId: uuid(), seq: null, role: "user", text, local: "sending" };
    byClientId.set(m.clientId, m);
    render(m);
    list.scrollTop = list.scrollHeight;
    post(m);
    return m.clientId;
  }

  // The same client_message_id on every attempt: the gateway answers a retried POST once.
  async function post(m, overloadedTries = 0) {
    m.local = "sending";
    paint(m);
    try {
      const res = await request(apiUrl("messages"), {
        visitor_id: visitorId,
        text: m.text,
        client_message_id: m.clientId,
      });
      if (res.message_id != null) bindId(m, String(res.message_id));
      setConversation(res.conversation_id);
      m.local = null;
      advance(m, res.status || "received");
    } catch (e) {
      if (e && e.retryAfterMs && overloadedTries < 3 && m.seq == null) {
        setTimeout(() => post(m, overloadedTries + 1), e.retryAfterMs);
        return; // still "sending"
      }
      // If the server's copy already came back, the message was stored after all.
      if (m.seq == null) {
        m.local = "error";
        m.error = e && e.message;
      }
    }
    paint(m);
  }

  list.addEventListener("click", (ev) => {
    const li = ev.target.closest(".msg.error");
    const m = li && byClientId.get(li.dataset.clientId);
    if (m && m.local === "error") post(m);
  });

  function setTyping(on) {
    clearTimeout(typingTimer);
    const stick = nearBottom();
    typing.hidden = !on;
    if (on) {
      typingTimer = setTimeout(() => setTyping(false), 20000); // in case "off" is lost
      if (stick) list.scrollTop = list.scrollHeight;
    }
  }

  function paintBadge() {
    badge.hidden = unread === 0;
    badge.textContent = unread > 9 ? "9+" : String(unread);
    launcher.setAttribute("aria-label", unread ? `Open chat (${unread} unread)` : "Open chat");
  }

  // ---- history and live updates ------------------------------------------------------------
  let loading = null;
  let reload = false;

  // Fetches everything after `synced`, page by page until a page is empty (the gateway may cap
  // page sizes). Concurrent calls coalesce into one more round.
  function refresh() {
    if (loading) {
      reload = true;
      return loading;
    }
    loading = (async () => {
      do {
        reload = false;
        for (let page = 0; page < 100; page++) {
          const after = synced;
          const gen = generation;
          let data;
          try {
            data = await request(apiUrl("messages", { after }));
          } catch (e) {
            console.warn("chat widget: loading messages failed:", e.message);
            break; // the next (re)connect tries again
          }
          const msgs = (data.messages || []).slice().sort((a, b) => a.seq - b.seq);
          if (data.conversation_id != null) setConversation(data.conversation_id);
          msgs.forEach((msg) => receive(msg, false));
          const cursor = typeof data.cursor === "number" ? data.cursor : after;
          if (gen === generation && cursor > synced) synced = cursor; // (not if reset meanwhile)
          if (!msgs.length || cursor <= after) break;
        }
      } while (reload);
      loading = null;
    })();
    return loading;
  }

  let ws = null;
  let attempt = 0;
  let retryTimer = 0;
  let openedAt = 0;

  function connect() {
    clearTimeout(retryTimer);
    retryTimer = 0;
    if (ws) return;
    const u = apiUrl("ws");
    u.protocol = u.protocol === "https:" ? "wss:" : "ws:";
    let sock;
    try {
      sock = ws = new WebSocket(u);
    } catch (e) {
      ws = null;
      return reconnectLater();
    }
    host.dataset.state = "connecting";
    sock.onopen = () => {
      openedAt = Date.now();
      host.dataset.state = "online";
      flushAcks();
      refresh(); // whatever was sent while we were away
    };
    sock.onmessage = (ev) => {
      let f;
      try {
        f = JSON.parse(ev.data);
      } catch (e) {
        return;
      }
      if (f.type === "message") receive(f.message, true);
      // The gateway lost its pub/sub subscription for a moment: frames sent meanwhile are
      // gone, so fetch after the last contiguous message, as after a reconnect.
      else if (f.type === "resync") refresh();
      else if (f.type === "typing") setTyping(Boolean(f.on));
      else if (f.type === "status") {
        const m = byId.get(String(f.message_id));
        if (m) {
          advance(m, f.status);
          paint(m);
        }
      }
    };
    sock.onclose = () => {
      if (ws !== sock) return;
      ws = null;
      host.dataset.state = "offline";
      setTyping(false);
      if (openedAt && Date.now() - openedAt > 10000) attempt = 0; // it was a healthy connection
      openedAt = 0;
      reconnectLater();
    };
  }

  // Exponential backoff with jitter, capped at 30 s: after a gateway restart thousands of
  // widgets must not reconnect in lockstep, and a flapping socket must not hammer it.
  function reconnectLater() {
    const ceiling = Math.min(30000, 500 * 2 ** Math.min(attempt++, 10));
    retryTimer = setTimeout(connect, ceiling / 2 + (Math.random() * ceiling) / 2);
  }

  function reconnectNow() {
    if (started && !ws) {
      attempt = 0;
      connect();
    }
  }
  window.addEventListener("online", reconnectNow);
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") reconnectNow();
  });

  let started = false;
  function start() {
    if (started) return;
    started = true;
    if (!cfg.visitorId) {
      try {
        window.localStorage.setItem(STORAGE_KEY, visitorId);
      } catch (e) {
        /* storage disabled: the conversation lasts as long as the page */
      }
    }
    refresh();
    connect();
  }

  // ---- panel -----------------------------------------------------------------------------
  function open() {
    start();
    panel.hidden = false;
    launcher.setAttribute("aria-expanded", "true");
    unread = 0;
    paintBadge();
    list.scrollTop = list.scrollHeight;
    input.focus();
  }

  function close() {
    const hadFocus = root.activeElement != null;
    panel.hidden = true;
    launcher.setAttribute("aria-expanded", "false");
    if (hadFocus) launcher.focus(); // do not strand keyboard users on a hidden element
  }

  const toggle = () => (panel.hidden ? open() : close());

  launcher.addEventListener("click", toggle);
  $(".close").addEventListener("click", close);
  panel.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape") close();
  });
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    if (send(input.value)) {
      input.value = "";
      grow();
    }
    input.focus();
  });
  input.addEventListener("keydown", (ev) => {
    // Enter sends, Shift+Enter is a newline; never while an IME composition is open.
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      form.requestSubmit();
    }
  });
  const grow = () => {
    input.style.height = "auto";
    input.style.height = `${Math.min(input.scrollHeight + 2, 120)}px`;
  };
  input.addEventListener("input", grow);

  function mount() {
    document.body.appendChild(host);
    if (returning) start();
    if (cfg.open === "true") open();
  }
  if (document.body) mount();
  else document.addEventListener("DOMContentLoaded", mount);

  window.ChatWidget = Object.freeze({
    open,
    close,
    toggle,
    send,
    get visitorId() {
      return visitorId;
    },
  });
})();
