/*
 * The agent inbox: plain JavaScript over the tenant admin API (/api/v1), no build step.
 *
 * - The key lives in sessionStorage (this tab only), is sent as a Bearer header and never in a URL.
 * - Live updates by polling, one request chain per loop (never two in flight): the conversation
 *   lists every 2 s, the open conversation every 1 s with after_seq. A failing loop backs off
 *   exponentially (with jitter, up to 30 s); a hidden tab polls 5 times slower; signing out (or
 *   a key the API stops accepting) stops every loop.
 * - Messages are keyed by id: a message seen twice (a poll that overlaps a send) updates its row.
 * - Data goes into the page as text only (textContent), never as HTML.
 */
(function () {
  "use strict";

  var API = "/api/v1";
  var KEY_STORE = "chat-inbox.key";
  var LIST_MS = 2000;
  var CONVERSATION_MS = 1000;
  var MAX_BACKOFF_MS = 30000;
  var HIDDEN_FACTOR = 5;
  var REQUEST_TIMEOUT_MS = 10000;
  var PAGE = 50;
  var MAX_PAGE = 200; // the API's largest page
  var MAX_PAGES_PER_POLL = 20; // a very long transcript loads over several polls
  // Delivery receipts of the last few replies are re-read on every poll (a receipt changes a
  // message already seen); older ones are refreshed when the conversation is opened again.
  var WATCH_LAST = 20;
  var SEND_ATTEMPTS = 3;

  var WHO = { user: "Visitor", assistant: "Bot", agent: "Agent", system: "Notice" };
  var TICKS = {
    queued: ["\u2026", "Queued"],
    sent: ["\u2713", "Sent"],
    delivered: ["\u2713\u2713", "Delivered"],
    read: ["\u2713\u2713", "Read"],
    failed: ["\u2717", "Failed"],
  };
  var STATUS_TEXT = {
    open: "Bot is answering",
    pending_human: "A human is answering",
    resolved: "Resolved",
  };

  function $(id) {
    return document.getElementById(id);
  }

  var el = {
    signin: $("signin"), key: $("key"), signinError: $("signin-error"),
    app: $("app"), who: $("who"), signout: $("signout"),
    search: $("search"), listError: $("list-error"),
    noSelection: $("no-selection"), head: $("conv-head"), back: $("back"),
    title: $("conv-title"), status: $("conv-status"), convError: $("conv-error"),
    takeOver: $("take-over"), handBack: $("hand-back"), resolve: $("resolve"),
    transcript: $("transcript"), replyForm: $("reply-form"), reply: $("reply"),
    send: $("send"), replyError: $("reply-error"),
    kbBot: $("kb-bot"), kbList: $("kb-list"), kbEmpty: $("kb-empty"),
    whPane: $("wh-pane"), whNote: $("wh-note"), whList: $("wh-list"), whFailed: $("wh-failed"),
  };
  var sections = {
    pending_human: { list: $("pending-list"), count: $("pending-count"), more: $("pending-more"),
      limit: PAGE, rows: new Map() },
    open: { list: $("open-list"), count: $("open-count"), more: $("open-more"),
      limit: PAGE, rows: new Map() },
  };

  var state = {
    key: null,
    session: 0, // bumped on sign-in and sign-out: answers of an older session are dropped
    query: "",
    conv: null, // {id, status, chatbotId, lastSeq, rows: Map id -> {msg, li}, order: [id]}
    pendingSend: null, // {conversationId, text, id}: a retried send reuses its client id
    chatbots: null, // Map id -> name
  };

  // -- the API ------------------------------------------------------------------------------

  function ApiError(status, code, message, field) {
    this.status = status;
    this.code = code;
    this.message = message;
    this.field = field;
  }

  function api(method, path, body, key) {
    var controller = new AbortController();
    var timer = setTimeout(function () { controller.abort(); }, REQUEST_TIMEOUT_MS);
    var headers = { Authorization: "Bearer " + (key || state.key), Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    return fetch(API + path, {
      method: method,
      headers: headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
      credentials: "omit",
      signal: controller.signal,
    }).then(function (response) {
      return response.text().then(function (raw) {
        var data = null;
        try { data = raw ? JSON.parse(raw) : null; } catch (e) { data = null; }
        if (!response.ok) {
          var err = (data && data.error) || {};
          throw new ApiError(response.status, err.code || "http_" + response.status,
            err.message || "the gateway answered " + response.status, err.field || null);
        }
        return data;
      });
    }, function () {
      throw new ApiError(0, "network", "the gateway cannot be reached", null);
    }).finally(function () {
      clearTimeout(timer);
    });
  }

  function retriable(err) {
    return err.status === 0 || err.status === 429 || err.status >= 500;
  }

  // -- polling loops ------------------------------------------------------------------------

  /** Runs `tick` again `intervalMs` after the previous run ended; never two runs at once. */
  function Loop(intervalMs, tick, onError, onOk) {
    var timer = null;
    var running = false;
    var again = false;
    var stopped = true;
    var failures = 0;

    function schedule() {
      if (stopped) return;
      var delay = document.hidden ? intervalMs * HIDDEN_FACTOR : intervalMs;
      if (failures) {
        var backoff = Math.min(MAX_BACKOFF_MS, intervalMs * Math.pow(2, failures));
        delay = Math.max(delay, backoff * (0.75 + Math.random() / 2));
      }
      timer = setTimeout(run, delay);
    }

    function run() {
      timer = null;
      if (stopped) return;
      running = true;
      again = false;
      var session = state.session;
      Promise.resolve().then(tick).then(function () {
        failures = 0;
        if (session === state.session) onOk();
      }, function (err) {
        failures += 1;
        if (session !== state.session) return;
        if (err && err.status === 401) {
          signOut("Signed out: " + err.message);
          return;
        }
        onError(err);
      }).then(function () {
        running = false;
        if (again) run();
        else schedule();
      });
    }

    return {
      start: function () {
        stopped = false;
        failures = 0;
        if (running) again = true; // (the run under way may be for what was shown before)
        else if (timer === null) run();
      },
      stop: function () {
        stopped = true;
        again = false;
        if (timer !== null) clearTimeout(timer);
        timer = null;
      },
      now: function () {
        if (stopped) return;
        if (running) { again = true; return; }
        if (timer !== null) clearTimeout(timer);
        run();
      },
    };
  }

  function problem(where) {
    return function (err) {
      where.textContent = "Updates paused (" + err.message + "); retrying\u2026";
    };
  }
  function clear(where) {
    return function () { where.textContent = ""; };
  }

  var listLoop = Loop(LIST_MS, refreshLists, problem(el.listError), clear(el.listError));
  // The conversation loop's trouble shares the alert line with the buttons' errors: it clears
  // only its own.
  var conversationLoop = Loop(CONVERSATION_MS, refreshConversation, function (err) {
    el.convError.dataset.kind = "poll";
    problem(el.convError)(err);
  }, function () {
    if (el.convError.dataset.kind === "poll") {
      el.convError.textContent = "";
      el.convError.dataset.kind = "";
    }
  });

  document.addEventListener("visibilitychange", function () {
    if (!document.hidden) {
      listLoop.now();
      conversationLoop.now();
    }
  });

  // -- signing in and out -------------------------------------------------------------------

  function storedKey() {
    try { return window.sessionStorage.getItem(KEY_STORE); } catch (e) { return null; }
  }
  function storeKey(key) {
    try {
      if (key) window.sessionStorage.setItem(KEY_STORE, key);
      else window.sessionStorage.removeItem(KEY_STORE);
    } catch (e) { /* storage off: the key lasts as long as the page */ }
  }

  function signIn(key) {
    return api("GET", "/me", undefined, key).then(function (me) {
      state.key = key;
      state.session += 1;
      storeKey(key);
      var tenant = me.tenant ? me.tenant.name : "";
      var label = me.key.name || me.key.prefix;
      el.who.textContent = tenant + " \u00b7 " + me.key.role + " key " + label;
      el.who.hidden = false;
      el.signout.hidden = false;
      el.signin.hidden = true;
      el.app.hidden = false;
      el.key.value = "";
      el.signinError.textContent = "";
      listLoop.start();
      // webhook health is for admin keys (the API refuses agents)
      el.whPane.hidden = me.key.role === "agent";
      if (me.key.role !== "agent") loadWebhooks();
      el.search.focus();
    }, function (err) {
      // A key the API refused is forgotten; one it could not check (gateway unreachable or
      // restarting) is kept, so reloading the page tries it again.
      if (!retriable(err)) storeKey(null);
      showSignIn(err.message);
    });
  }

  function signOut(message) {
    state.session += 1;
    state.key = null;
    el.whPane.hidden = true;
    storeKey(null);
    listLoop.stop();
    conversationLoop.stop();
    select(null);
    for (var name in sections) {
      sections[name].rows.forEach(function (li) { li.remove(); });
      sections[name].rows.clear();
      sections[name].count.textContent = "";
      sections[name].more.hidden = true;
      sections[name].limit = PAGE;
    }
    state.chatbots = null;
    state.pendingSend = null;
    state.query = "";
    el.search.value = "";
    el.listError.textContent = "";
    el.who.textContent = "";
    el.who.hidden = true;
    el.signout.hidden = true;
    el.app.hidden = true;
    showSignIn(message || "");
  }

  function showSignIn(message) {
    el.signin.hidden = false;
    el.signinError.textContent = message;
    el.key.focus();
  }

  el.signin.addEventListener("submit", function (event) {
    event.preventDefault();
    var key = el.key.value.trim();
    if (!key) {
      el.signinError.textContent = "Paste an API key (cbk_\u2026).";
      return;
    }
    el.signinError.textContent = "";
    signIn(key);
  });
  el.signout.addEventListener("click", function () { signOut(""); });

  // -- the conversation lists ---------------------------------------------------------------

  function contactName(contact) {
    if (!contact) return "Unknown contact";
    return contact.name || contact.external_id || "Unknown contact";
  }

  function when(iso) {
    if (!iso) return "";
    var d = new Date(iso);
    if (isNaN(d.getTime())) return "";
    var time = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    if (d.toDateString() === new Date().toDateString()) return time;
    return d.toLocaleDateString([], { month: "short", day: "numeric" }) + " " + time;
  }

  function refreshLists() {
    var session = state.session;
    var query = state.query;
    var q = query ? "&q=" + encodeURIComponent(query) : "";
    var names = ["pending_human", "open"];
    return Promise.all(names.map(function (name) {
      return api("GET", "/conversations?status=" + name + "&limit=" + sections[name].limit + q);
    })).then(function (pages) {
      if (session !== state.session || query !== state.query) return;
      names.forEach(function (name, i) { renderSection(name, pages[i]); });
    });
  }

  function renderSection(name, page) {
    var section = sections[name];
    var seen = new Set();
    var focused = document.activeElement;
    page.items.forEach(function (item, index) {
      seen.add(item.id);
      var li = section.rows.get(item.id);
      if (!li) {
        li = rowFor(item.id);
        section.rows.set(item.id, li);
      }
      fillRow(li, item);
      // Move only rows out of place: moving the focused row would take its focus away.
      if (section.list.children[index] !== li) section.list.insertBefore(li, section.list.children[index] || null);
    });
    section.rows.forEach(function (li, id) {
      if (!seen.has(id)) {
        li.remove();
        section.rows.delete(id);
      }
    });
    if (focused && focused !== document.activeElement && document.body.contains(focused)) {
      focused.focus();
    }
    section.count.textContent = "(" + page.items.length + (page.next_cursor ? "+" : "") + ")";
    section.more.hidden = !(page.next_cursor && section.limit < MAX_PAGE);
  }

  function rowFor(id) {
    var li = document.createElement("li");
    var button = document.createElement("button");
    button.type = "button";
    button.className = "conversation";
    button.dataset.id = id;
    var name = document.createElement("span");
    name.className = "name";
    var meta = document.createElement("span");
    meta.className = "meta";
    button.append(name, meta);
    button.addEventListener("click", function () { select(id, true); });
    li.appendChild(button);
    return li;
  }

  function fillRow(li, item) {
    var button = li.firstChild;
    var name = contactName(item.contact);
    var meta = STATUS_TEXT[item.status] || item.status;
    var at = when(item.last_activity_at);
    if (at) meta += " \u00b7 " + at;
    if (button.children[0].textContent !== name) button.children[0].textContent = name;
    if (button.children[1].textContent !== meta) button.children[1].textContent = meta;
    button.dataset.externalId = item.contact ? item.contact.external_id : "";
    button.dataset.status = item.status;
    button.setAttribute("aria-current", state.conv && state.conv.id === item.id ? "true" : "false");
  }

  function markSelected() {
    var id = state.conv ? state.conv.id : null;
    for (var name in sections) {
      sections[name].rows.forEach(function (li, rowId) {
        li.firstChild.setAttribute("aria-current", rowId === id ? "true" : "false");
      });
    }
  }

  for (var sectionName in sections) {
    (function (section) {
      section.more.addEventListener("click", function () {
        section.limit = Math.min(MAX_PAGE, section.limit + PAGE);
        listLoop.now();
      });
    })(sections[sectionName]);
  }

  var searchTimer = null;
  el.search.addEventListener("input", function () {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(function () {
      state.query = el.search.value.trim().slice(0, 200);
      listLoop.now();
    }, 300);
  });

  // Up and down arrows move between conversations.
  $("list-pane").addEventListener("keydown", function (event) {
    if (event.key !== "ArrowDown" && event.key !== "ArrowUp") return;
    var buttons = Array.prototype.slice.call(document.querySelectorAll("#list-pane button.conversation"));
    var at = buttons.indexOf(document.activeElement);
    if (at < 0) return;
    var next = buttons[at + (event.key === "ArrowDown" ? 1 : -1)];
    if (next) {
      event.preventDefault();
      next.focus();
    }
  });

  // -- one conversation ---------------------------------------------------------------------

  function narrow() {
    return window.matchMedia("(max-width: 700px)").matches;
  }

  function select(id, fromUser) {
    if (state.conv && state.conv.id === id) return;
    conversationLoop.stop();
    state.conv = id ? { id: id, status: null, chatbotId: null, lastSeq: 0, rows: new Map(),
      order: [], loaded: false } : null;
    el.transcript.textContent = "";
    el.convError.textContent = "";
    el.convError.dataset.kind = "";
    el.replyError.textContent = "";
    el.reply.value = "";
    markSelected();
    document.body.classList.toggle("has-selection", Boolean(id));
    el.noSelection.hidden = Boolean(id);
    el.head.hidden = !id;
    el.transcript.hidden = !id;
    el.replyForm.hidden = !id;
    if (!id) {
      el.title.textContent = "";
      el.status.textContent = "";
      renderKnowledge(null);
      return;
    }
    el.title.textContent = "Conversation";
    el.status.textContent = "Loading\u2026";
    el.status.dataset.status = "";
    setButtons(null);
    // The first load is the history, not news: screen readers announce additions only after it.
    el.transcript.setAttribute("aria-busy", "true");
    conversationLoop.start();
    if (fromUser && narrow()) el.title.focus();
  }

  el.back.addEventListener("click", function () {
    var id = state.conv && state.conv.id;
    select(null);
    var row = id && document.querySelector('#list-pane button.conversation[data-id="' + id + '"]');
    if (row) row.focus();
    else el.search.focus();
  });

  document.addEventListener("keydown", function (event) {
    if (event.key === "Escape" && state.conv && narrow() && !el.app.hidden) el.back.click();
  });

  /** after_seq for the next poll: the last message, or just before the oldest reply of the
   *  last few whose delivery can still change, so its new status comes back too. */
  function watchFrom(conv) {
    var after = conv.lastSeq;
    var start = Math.max(0, conv.order.length - WATCH_LAST);
    for (var i = start; i < conv.order.length; i++) {
      var msg = conv.rows.get(conv.order[i]).msg;
      if (msg.role !== "user" && msg.status !== "read" && msg.seq - 1 < after) {
        after = msg.seq - 1;
        break;
      }
    }
    return after;
  }

  function refreshConversation() {
    var conv = state.conv;
    if (!conv) return undefined;
    var pages = 0;
    function fetchFrom(after) {
      var limit = MAX_PAGE;
      return api("GET", "/conversations/" + encodeURIComponent(conv.id) + "?after_seq=" + after + "&limit=" + limit)
        .then(function (data) {
          if (state.conv !== conv) return undefined;
          applyConversation(conv, data);
          pages += 1;
          if (data.messages.length >= limit && pages < MAX_PAGES_PER_POLL) {
            return fetchFrom(data.next_after_seq);
          }
          if (!conv.loaded) {
            conv.loaded = true;
            el.transcript.setAttribute("aria-busy", "false");
            scrollToEnd(true);
          }
          return undefined;
        });
    }
    return fetchFrom(watchFrom(conv)).catch(function (err) {
      if (err.status === 404 && state.conv === conv) {
        el.status.textContent = "Not found";
        conversationLoop.stop();
        el.convError.textContent = "This conversation is gone: " + err.message;
        return;
      }
      throw err;
    });
  }

  function applyConversation(conv, data) {
    el.title.textContent = contactName(data.contact);
    setStatus(conv, data.status);
    if (conv.chatbotId !== data.chatbot_id) {
      conv.chatbotId = data.chatbot_id;
      loadKnowledge(conv);
    }
    var nearEnd = atEnd();
    var added = false;
    data.messages.forEach(function (msg) {
      if (upsert(conv, msg)) added = true;
    });
    if (added && nearEnd) scrollToEnd(false);
  }

  function setStatus(conv, status) {
    conv.status = status;
    el.status.textContent = STATUS_TEXT[status] || status;
    el.status.dataset.status = status;
    setButtons(status);
  }

  function setButtons(status) {
    el.takeOver.disabled = status !== "open";
    el.handBack.disabled = status !== "pending_human";
    el.resolve.disabled = !status || status === "resolved";
    el.reply.disabled = !status || status === "resolved";
    el.send.disabled = el.reply.disabled;
    el.reply.placeholder = status === "resolved"
      ? "This conversation is resolved."
      : "Write a reply (Enter sends, Shift+Enter for a new line)";
  }

  /** Adds or updates a message; true when it was new. */
  function upsert(conv, msg) {
    var row = conv.rows.get(msg.id);
    if (row) {
      row.msg = msg;
      fillMessage(row.li, msg);
      return false;
    }
    var li = document.createElement("li");
    li.className = "msg";
    li.dataset.id = msg.id;
    li.dataset.role = msg.role;
    var who = document.createElement("span");
    who.className = "who";
    var text = document.createElement("span");
    text.className = "text";
    var foot = document.createElement("span");
    foot.className = "foot";
    var time = document.createElement("time");
    var tick = document.createElement("span");
    tick.className = "tick";
    var glyph = document.createElement("span");
    glyph.setAttribute("aria-hidden", "true");
    var label = document.createElement("span");
    label.className = "sr-only";
    tick.append(glyph, label);
    foot.append(time, tick);
    li.append(who, text, foot);
    fillMessage(li, msg);
    // In seq order; a newer message normally just goes last.
    var index = conv.order.length;
    while (index > 0 && conv.rows.get(conv.order[index - 1]).msg.seq > msg.seq) index -= 1;
    var before = index < conv.order.length ? conv.rows.get(conv.order[index]).li : null;
    el.transcript.insertBefore(li, before);
    conv.order.splice(index, 0, msg.id);
    conv.rows.set(msg.id, { msg: msg, li: li });
    if (msg.seq > conv.lastSeq) conv.lastSeq = msg.seq;
    return true;
  }

  function fillMessage(li, msg) {
    var who = li.children[0];
    var text = li.children[1];
    var time = li.children[2].children[0];
    var tick = li.children[2].children[1];
    who.textContent = (WHO[msg.role] || msg.role) + ":";
    if (text.textContent !== msg.text) text.textContent = msg.text;
    time.dateTime = msg.created_at || "";
    time.textContent = when(msg.created_at);
    var mark = msg.role === "user" ? null : TICKS[msg.status];
    tick.hidden = !mark;
    tick.dataset.status = mark ? msg.status : "";
    if (mark) {
      var glyph = mark[0];
      var label = mark[1];
      if (msg.status === "failed" && msg.error_code) {
        glyph += " " + msg.error_code;
        label += " (" + msg.error_code + ")";
      }
      tick.children[0].textContent = glyph;
      tick.children[1].textContent = " " + label;
      tick.title = label;
    }
  }

  function atEnd() {
    var t = el.transcript;
    return t.scrollHeight - t.scrollTop - t.clientHeight < 40;
  }

  function scrollToEnd(always) {
    if (always || atEnd()) el.transcript.scrollTop = el.transcript.scrollHeight;
    if (narrow()) {
      var last = el.transcript.lastElementChild;
      if (last && last.scrollIntoView && always) last.scrollIntoView({ block: "nearest" });
    }
  }

  // -- actions ------------------------------------------------------------------------------

  function action(path, button) {
    var conv = state.conv;
    if (!conv) return;
    button.disabled = true;
    el.convError.textContent = "";
    el.convError.dataset.kind = "action";
    api("POST", "/conversations/" + encodeURIComponent(conv.id) + "/" + path).then(function (data) {
      if (state.conv === conv) setStatus(conv, data.status);
      listLoop.now();
      conversationLoop.now();
    }, function (err) {
      if (err.status === 401) { signOut("Signed out: " + err.message); return; }
      if (state.conv === conv) {
        el.convError.textContent = "Could not " + button.textContent.toLowerCase() + ": " + err.message;
        setButtons(conv.status);
      }
    });
  }

  el.takeOver.addEventListener("click", function () { action("take-over", el.takeOver); });
  el.handBack.addEventListener("click", function () { action("hand-back", el.handBack); });
  el.resolve.addEventListener("click", function () { action("resolve", el.resolve); });

  function randomId() {
    var bytes = new Uint8Array(16);
    window.crypto.getRandomValues(bytes);
    return Array.prototype.map.call(bytes, function (b) {
      return (b < 16 ? "0" : "") + b.toString(16);
    }).join("");
  }

  function pause(ms) {
    return new Promise(function (resolve) { setTimeout(resolve, ms); });
  }

  function sendReply() {
    var conv = state.conv;
    var text = el.reply.value.trim();
    if (!conv || !text || el.send.disabled) return;
    var p = state.pendingSend;
    // Sending the same text again after a failure reuses its id: the API stores it once.
    if (!p || p.conversationId !== conv.id || p.text !== text) {
      p = state.pendingSend = { conversationId: conv.id, text: text, id: randomId() };
    }
    var session = state.session;
    el.send.disabled = true;
    el.replyError.textContent = "";
    function attempt(n) {
      return api("POST", "/conversations/" + encodeURIComponent(conv.id) + "/messages",
        { text: text, client_message_id: p.id }).catch(function (err) {
        if (retriable(err) && n + 1 < SEND_ATTEMPTS && session === state.session) {
          return pause(1000 * Math.pow(2, n)).then(function () { return attempt(n + 1); });
        }
        throw err;
      });
    }
    attempt(0).then(function (msg) {
      if (state.pendingSend === p) state.pendingSend = null;
      if (session !== state.session || state.conv !== conv) return;
      if (el.reply.value.trim() === text) el.reply.value = "";
      upsert(conv, msg);
      scrollToEnd(true);
      if (conv.status === "open") setStatus(conv, "pending_human"); // replying takes over
      listLoop.now();
      conversationLoop.now();
    }, function (err) {
      if (session !== state.session) return;
      if (err.status === 401) { signOut("Signed out: " + err.message); return; }
      if (state.conv === conv) {
        el.replyError.textContent = "Not sent: " + err.message + ". Press Send to try again.";
      }
    }).then(function () {
      if (state.conv === conv) setButtons(conv.status);
    });
  }

  el.replyForm.addEventListener("submit", function (event) {
    event.preventDefault();
    sendReply();
  });
  el.reply.addEventListener("keydown", function (event) {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      sendReply();
    }
  });

  // -- the knowledge panel ------------------------------------------------------------------

  function loadKnowledge(conv) {
    var session = state.session;
    var botId = conv.chatbotId;
    renderKnowledge(null);
    el.kbBot.textContent = "Loading\u2026";
    var names = state.chatbots
      ? Promise.resolve(state.chatbots)
      : api("GET", "/chatbots").then(function (data) {
        var map = new Map();
        data.items.forEach(function (bot) { map.set(bot.id, bot.name); });
        if (session === state.session) state.chatbots = map;
        return map;
      });
    Promise.all([names, api("GET", "/chatbots/" + encodeURIComponent(botId) + "/documents")])
      .then(function (results) {
        if (session !== state.session || state.conv !== conv) return;
        el.kbBot.textContent = "Chatbot: " + (results[0].get(botId) || botId);
        renderKnowledge(results[1].items);
      }, function (err) {
        if (session !== state.session || state.conv !== conv) return;
        el.kbBot.textContent = "Could not load the documents: " + err.message;
      });
  }

  function renderKnowledge(items) {
    el.kbList.textContent = "";
    el.kbEmpty.hidden = !items || items.length > 0;
    if (!items) {
      el.kbBot.textContent = "";
      return;
    }
    items.forEach(function (doc) {
      var li = document.createElement("li");
      var title = document.createElement("strong");
      title.textContent = doc.title;
      var meta = document.createElement("span");
      meta.className = "muted";
      var parts = [doc.chunk_count + (doc.chunk_count === 1 ? " chunk" : " chunks")];
      if (doc.source) parts.unshift(doc.source);
      meta.textContent = " \u2014 " + parts.join(", ");
      li.append(title, meta);
      el.kbList.appendChild(li);
    });
  }

  // -- webhook health (admin keys) ------------------------------------------------------------

  function loadWebhooks() {
    var session = state.session;
    el.whNote.textContent = "Loading\u2026";
    Promise.all([
      api("GET", "/webhooks/endpoints"),
      api("GET", "/webhooks/events?status=failed&limit=5"),
    ]).then(function (results) {
      if (session !== state.session) return;
      renderEndpoints(results[0].items);
      renderFailed(results[1].items);
    }, function (err) {
      if (session !== state.session) return;
      el.whNote.textContent = "Could not load the webhooks: " + err.message;
    });
  }

  function renderEndpoints(items) {
    el.whList.textContent = "";
    el.whNote.textContent = items.length ? "" : "No endpoints.";
    items.forEach(function (endpoint) {
      var li = document.createElement("li");
      var url = document.createElement("code");
      url.textContent = endpoint.url;
      var health = endpoint.health || {};
      var state_ = document.createElement("span");
      var parts = [];
      if (!endpoint.enabled) {
        state_.className = "error";
        parts.push("disabled" + (health.disabled_reason ? ": " + health.disabled_reason : ""));
      } else if (health.consecutive_failures) {
        state_.className = "error";
        parts.push(health.consecutive_failures + " failures in a row");
      } else {
        parts.push("ok");
      }
      parts.push(health.last_success_at ? "last success " + when(health.last_success_at) : "no success yet");
      state_.textContent = " \u2014 " + parts.join(", ");
      li.append(url, state_);
      el.whList.appendChild(li);
    });
  }

  function renderFailed(items) {
    el.whFailed.textContent = "";
    if (!items.length) {
      var none = document.createElement("li");
      none.className = "muted";
      none.textContent = "None.";
      el.whFailed.appendChild(none);
      return;
    }
    items.forEach(function (event) {
      var li = document.createElement("li");
      li.textContent = event.type + " \u2014 " + when(event.created_at);
      el.whFailed.appendChild(li);
    });
  }

  // -- start --------------------------------------------------------------------------------

  var saved = storedKey();
  if (saved) signIn(saved);
  else showSignIn("");
})();
