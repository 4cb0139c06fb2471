// What both pages share: the key, API calls with errors shown, the event stream reader.
"use strict";

const RM = (() => {
  const KEY = "rolemesh.key";
  const key = () => localStorage.getItem(KEY) || "";

  function setupKeyForm(onChange) {
    const form = document.getElementById("keyform");
    const input = document.getElementById("key");
    input.value = key();
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      localStorage.setItem(KEY, input.value.trim());
      onChange();
    });
  }

  function authHeaders(extra) {
    const h = Object.assign({}, extra || {});
    if (key()) h.Authorization = "Bearer " + key();
    return h;
  }

  function showError(message) {
    const box = document.getElementById("error");
    if (!message) { box.hidden = true; box.textContent = ""; return; }
    box.hidden = false;
    box.textContent = message;
  }

  // fetch + the OpenAI-shaped error's message, whatever the status.
  async function api(method, path, body, headers) {
    const init = { method, headers: authHeaders(headers) };
    if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers["Content-Type"] = "application/json";
    }
    let resp;
    try {
      resp = await fetch(path, init);
    } catch (err) {
      if (method !== "GET") {
        document.body.dataset.actions = String(Number(document.body.dataset.actions || 0) + 1);
      }
      return { ok: false, status: 0, error: `${method} ${path}: ${err}` };
    }
    const text = await resp.text();
    if (method !== "GET") {  // a count of finished actions: tests (and people) can wait on it
      document.body.dataset.actions = String(Number(document.body.dataset.actions || 0) + 1);
    }
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
    const out = { ok: resp.ok, status: resp.status, data, headers: resp.headers };
    if (!resp.ok) {
      const msg = data && data.error && data.error.message ? data.error.message : text;
      out.error = `${method} ${path}: HTTP ${resp.status}: ${msg || resp.statusText}`;
    }
    return out;
  }

  // Read an SSE body to its end: onMessage(type, payload) per event with JSON data
  // (comments, and events without data, are skipped).
  async function readEvents(resp, onMessage) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        let type = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) type = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
        }
        if (data.length) {
          try { onMessage(type, JSON.parse(data.join("\n"))); } catch (err) {
            console.error("event", type, err);
          }
        }
      }
    }
  }

  // Server-sent events over fetch (EventSource cannot send an Authorization header).
  // Calls onMessage(type, payload) per event, onState(live) as the stream comes and goes,
  // and reconnects with a growing pause.
  function stream(path, onMessage, onState) {
    let stopped = false;
    let controller = null;
    let pause = 500;
    async function run() {
      while (!stopped) {
        controller = new AbortController();
        try {
          const resp = await fetch(path, { headers: authHeaders(), signal: controller.signal });
          if (!resp.ok) {
            const text = await resp.text();
            let msg = text;
            try { msg = JSON.parse(text).error.message; } catch (_) { /* as it is */ }
            throw new Error(`GET ${path}: HTTP ${resp.status}: ${msg}`);
          }
          onState(true, null);
          pause = 500;
          await readEvents(resp, onMessage);
          onState(false, null);
        } catch (err) {
          if (stopped) return;
          onState(false, String(err.message || err));
        }
        await new Promise((r) => setTimeout(r, pause));
        pause = Math.min(pause * 2, 10000);
      }
    }
    run();
    return { stop() { stopped = true; if (controller) controller.abort(); },
             restart() { if (controller) controller.abort(); } };
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  const mb = (v) => v === null || v === undefined ? "?"
    : v >= 1024 ? (v / 1024).toFixed(1) + " GB" : v + " MB";
  const secs = (v) => v === null || v === undefined ? "–"
    : v < 1 ? Math.round(v * 1000) + " ms" : v < 120 ? v.toFixed(v < 10 ? 2 : 1) + " s"
      : v < 7200 ? Math.round(v / 60) + " min" : Math.round(v / 3600) + " h";
  const ago = (at) => {
    const s = Math.max(0, Date.now() / 1000 - at);
    return s < 60 ? Math.round(s) + " s ago" : s < 3600 ? Math.round(s / 60) + " min ago"
      : Math.round(s / 3600) + " h ago";
  };

  return { key, setupKeyForm, api, stream, readEvents, showError, el, mb, secs, ago };
})();
