// The cluster page: nodes, devices, resident models, recent requests, loads and stops.
"use strict";

(() => {
  const { api, el, mb, secs, ago, showError } = RM;
  const MAX_ROWS = 50;
  let nodes = [];
  const requests = [];
  const lifecycle = [];
  let refreshTimer = null;

  // -- reading a device ---------------------------------------------------------------------

  function instancesOf(status) {
    return Array.isArray(status.instances) ? status.instances : [];
  }

  function chargedOf(status, instances) {
    if (status.memory_charged_mb !== undefined && status.memory_charged_mb !== null) {
      return status.memory_charged_mb;
    }
    const sum = instances.reduce((a, i) => a + (i.memory_charged_mb || 0), 0);
    return instances.length ? sum : 0;
  }

  // -- actions (admin key) -----------------------------------------------------------------

  async function act(method, path, body) {
    const r = await api(method, path, body);
    if (!r.ok) { showError(r.error); return; }
    showError(null);
    scheduleRefresh(0);
  }

  // The dispatcher's verbs take {node, device}; an instance's device is its placement
  // ("gpu:0+gpu:1" for a model split over a group).
  const unload = (node, device, model) =>
    act("POST", `/v1/models/${encodeURIComponent(model)}/unload`, { node, device });
  const load = (node, device, model) =>
    act("POST", `/v1/models/${encodeURIComponent(model)}/load`, { node, device });
  const drain = (node, back) =>
    act("POST", `/v1/nodes/${encodeURIComponent(node)}/${back ? "undrain" : "drain"}`, {});

  // The tail of an instance's llama-server output, then its new lines as they come.
  let logFollow = null;
  async function showLog(node, device, model) {
    if (logFollow) logFollow.abort();
    const q = new URLSearchParams({ device, lines: "200" });
    if (model) q.set("model", model);
    const path = `/v1/nodes/${encodeURIComponent(node)}/logs`;
    const r = await api("GET", `${path}?${q}`);
    const pre = document.getElementById("log");
    document.getElementById("logbox").hidden = false;
    document.getElementById("logtitle").textContent = `${model || ""} on ${node}/${device}`;
    pre.textContent = r.ok ? r.data.lines.join("\n") : r.error;
    if (!r.ok) return;
    q.set("lines", "0");
    q.set("follow", "1");
    logFollow = new AbortController();
    try {
      const resp = await fetch(`${path}?${q}`, { headers: RM.key() ? {
        Authorization: "Bearer " + RM.key() } : {}, signal: logFollow.signal });
      await RM.readEvents(resp, (type, data) => {
        if (type !== "message" || data.line === undefined) return;  // "end" closes it
        pre.textContent += (pre.textContent ? "\n" : "") + data.line;
        pre.scrollTop = pre.scrollHeight;
      });
    } catch (_) { /* closed, or the instance stopped */ }
  }

  // -- rendering -----------------------------------------------------------------------------

  function memoryBar(status, charged) {
    const total = status.memory_total_mb;
    const pct = (v) => total ? Math.min(100, (100 * (v || 0)) / total) + "%" : "0%";
    return el("div", {},
      el("div", { class: "bar", title: "measured used / charged to residents / total" },
        el("span", { class: "used", style: `width:${pct(status.memory_used_mb)}` }),
        el("span", { class: "charged", style: `width:${pct(charged)}` })),
      el("div", { class: "legend", "data-testid": "memory" },
        el("i", { style: "background:var(--charged)" }), `charged ${mb(charged)}`,
        el("i", { style: "background:var(--info);opacity:.55" }),
        `measured ${mb(status.memory_used_mb)}`, ` · total ${mb(total)}`));
  }

  function instanceRow(node, status, inst) {
    const queue = `${inst.in_flight || 0} + ${inst.queued || 0}`;
    const ttl = inst.pinned ? "pinned" : inst.ttl_left_s === null || inst.ttl_left_s === undefined
      ? "–" : secs(inst.ttl_left_s);
    return el("tr", { "data-testid": "instance", "data-model": inst.model_id },
      el("td", {}, el("b", {}, inst.model_id)),
      el("td", { class: `s-${inst.state}`, "data-testid": "instance-state" }, inst.state),
      el("td", { title: "in flight + queued" }, queue),
      el("td", { title: "idle time left before it is unloaded" }, ttl),
      el("td", {}, mb(inst.memory_charged_mb),
        inst.memory_source ? el("span", { class: "muted" }, ` ${inst.memory_source}`) : null),
      el("td", {},
        el("button", { type: "button", onclick: () => showLog(node.node_id, status.device_id,
          inst.model_id) }, "logs"),
        RM.key() ? el("button", { type: "button", "data-testid": "unload",
          onclick: () => unload(node.node_id, (inst.devices || [status.device_id]).join("+"),
            inst.model_id) }, "unload")
          : null));
  }

  function deviceCard(node, d) {
    const status = d.status;
    const instances = instancesOf(status);
    const charged = chargedOf(status, instances);
    const loadSelect = el("select", { "aria-label": "model to load" },
      (node.models || []).map((m) => el("option", { value: m.model_id }, m.model_id)));
    return el("div", { class: "device", "data-testid": "device", "data-device": status.device_id },
      el("div", {}, el("b", {}, status.device_id), " ", el("span", { class: "muted" },
        status.name || ""), status.mode ? el("span", { class: "badge" }, `mode ${status.mode}`)
        : null),
      memoryBar(status, charged),
      instances.length ? el("table", { class: "instances" },
        el("tr", {}, ["model", "state", "queue", "TTL", "charged", ""].map((h) =>
          el("th", {}, h))),
        instances.map((i) => instanceRow(node, status, i)))
        : el("p", { class: "muted" }, status.last_error
          ? `no model loaded; last error: ${status.last_error}` : "no model loaded"),
      status.failed_models && Object.keys(status.failed_models).length
        ? el("p", { class: "s-failed" }, "backing off: " +
          Object.entries(status.failed_models).map(([m, s]) => `${m} (${secs(s)})`).join(", "))
        : null,
      RM.key() ? el("div", { class: "actions" }, loadSelect,
        el("button", { type: "button", "data-testid": "load",
          onclick: () => load(node.node_id, status.device_id, loadSelect.value) }, "load"))
        : null);
  }

  function nodeCard(node) {
    const draining = node.draining === true;
    return el("div", { class: "node", "data-testid": "node", "data-node": node.node_id },
      el("div", { class: "node-head" },
        el("b", {}, node.node_id),
        el("span", { class: `badge s-${node.state}`, "data-testid": "node-state" }, node.state),
        draining ? el("span", { class: "badge s-draining" }, "draining") : null,
        el("span", { class: "muted" }, `${node.backend} · ${node.url} · heartbeat `
          + `${secs(node.last_heartbeat_age_s)} ago`),
        RM.key() ? el("button", { type: "button", "data-testid": "drain",
          onclick: () => drain(node.node_id, draining) }, draining ? "undrain" : "drain")
          : null),
      el("div", { class: "devices" }, node.devices.map((d) => deviceCard(node, d))));
  }

  function renderNodes() {
    const box = document.getElementById("nodes");
    box.replaceChildren(...(nodes.length ? nodes.map(nodeCard)
      : [el("p", { class: "muted" }, "no node has registered yet")]));
  }

  function renderRequests() {
    document.getElementById("requests").replaceChildren(...requests.map((e) =>
      el("tr", { "data-testid": "request" },
        el("td", {}, ago(e.at)), el("td", {}, e.name),
        el("td", {}, e.model_id || "–"),
        el("td", {}, e.node_id ? `${e.node_id}/${e.device_id}` : "–"),
        el("td", {}, secs(e.ttft_s)), el("td", {}, secs(e.duration_s)),
        el("td", { class: e.outcome === "ok" ? "o-ok" : "o-bad" }, e.outcome))));
  }

  function renderLifecycle() {
    document.getElementById("lifecycle").replaceChildren(...lifecycle.map((e) =>
      el("tr", { "data-testid": "lifecycle-row" },
        el("td", {}, ago(e.at)),
        el("td", {}, e.type === "model.loaded" ? "loaded" : e.type === "model.stopped"
          ? "stopped" : e.type.replace("node.", "node ")),
        el("td", {}, e.model_id || "–"),
        el("td", {}, e.device_id ? `${e.node_id}/${e.device_id}` : e.node_id),
        el("td", { class: "why" }, e.type === "model.loaded" ? (e.load_s ? `in ${secs(e.load_s)}` : "")
          : [e.reason, e.detail, e.why].filter(Boolean).join(": ")))));
  }

  // -- data ----------------------------------------------------------------------------------

  async function refresh() {
    const r = await api("GET", "/v1/nodes");
    if (!r.ok) { showError(r.error); return; }
    nodes = r.data.data;
    renderNodes();
  }

  function scheduleRefresh(delay) {
    clearTimeout(refreshTimer);
    refreshTimer = setTimeout(refresh, delay === undefined ? 150 : delay);
  }

  function remember(e) {
    if (e.type === "request.done") {
      requests.unshift(e);
      requests.length = Math.min(requests.length, MAX_ROWS);
    } else if (e.type.startsWith("model.") || e.type.startsWith("node.")) {
      lifecycle.unshift(e);
      lifecycle.length = Math.min(lifecycle.length, MAX_ROWS);
    }
  }

  function onEvent(type, payload) {
    if (type === "snapshot") {
      nodes = payload.nodes;
      requests.length = 0;
      lifecycle.length = 0;
      for (const e of payload.recent) remember(e);  // oldest first: the newest ends on top
      renderNodes();
    } else {
      remember(payload);
      if (type !== "request.done") scheduleRefresh();
    }
    renderRequests();
    renderLifecycle();
  }

  function onState(live, error) {
    const conn = document.getElementById("conn");
    conn.textContent = live ? "live" : "reconnecting…";
    conn.className = live ? "conn live" : "conn";
    if (error) showError(error); else if (live) showError(null);
  }

  let events = RM.stream("/v1/events", onEvent, onState);
  RM.setupKeyForm(() => { events.stop(); events = RM.stream("/v1/events", onEvent, onState); });
  document.getElementById("logclose").addEventListener("click", () => {
    if (logFollow) logFollow.abort();
    document.getElementById("logbox").hidden = true;
  });
  // Figures (memory, queues, heartbeat age) change without events: refresh them slowly.
  setInterval(() => scheduleRefresh(0), 5000);
  setInterval(() => { renderRequests(); renderLifecycle(); }, 10000);
})();
