// The routing page: GET /v1/routing shown and edited in place (PUT + If-Match), and each
// device's mode (POST /v1/nodes/{node}/mode).
"use strict";

(() => {
  const { api, el, showError } = RM;
  let etag = null;
  let doc = null;

  function rowsOf(taskTypes) {
    return Object.entries(taskTypes || {}).map(([task, role]) =>
      el("tr", { "data-testid": "task-row" },
        el("td", {}, el("input", { class: "task", value: task, "aria-label": "task type" })),
        el("td", {}, el("input", { class: "role", value: role, "aria-label": "role" })),
        el("td", {}, el("button", { type: "button",
          onclick: (ev) => ev.target.closest("tr").remove() }, "remove"))));
  }

  function render() {
    const table = doc.table || {};
    const body = el("tbody", { id: "task-rows" }, rowsOf(table.task_types));
    const rest = Object.assign({}, table);
    delete rest.task_types;
    const rules = el("textarea", { id: "rules", "aria-label": "content rules and the rest",
      spellcheck: "false" });
    rules.value = JSON.stringify(rest, null, 2);
    const saved = el("span", { class: "saved", id: "saved" });
    document.getElementById("routing").replaceChildren(
      el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "task type"),
        el("th", {}, "role"), el("th", {}))), body),
      el("div", { class: "actions" },
        el("button", { type: "button", onclick: () => body.append(...rowsOf({ "": "" })) },
          "add a row")),
      el("h2", {}, "Content rules, keyword rules, fallbacks, default (JSON)"),
      rules,
      el("div", { class: "actions" },
        el("button", { type: "button", "data-testid": "save", onclick: save }, "save"),
        el("button", { type: "button", onclick: load }, "reload"), saved));
    document.getElementById("version").textContent =
      `version ${doc.version} (${doc.source || "config"})`;
  }

  async function save() {
    let rest;
    try {
      rest = JSON.parse(document.getElementById("rules").value || "{}");
    } catch (err) {
      showError(`the rules are not valid JSON: ${err.message}`);
      return;
    }
    const taskTypes = {};
    for (const tr of document.querySelectorAll("#task-rows tr")) {
      const task = tr.querySelector(".task").value.trim();
      const role = tr.querySelector(".role").value.trim();
      if (task) taskTypes[task] = role;
    }
    const table = Object.assign({}, rest, { task_types: taskTypes });
    const r = await api("PUT", "/v1/routing", table, etag ? { "If-Match": etag } : {});
    if (!r.ok) { showError(r.error); return; }
    showError(null);
    await load();
    document.getElementById("saved").textContent = "saved";
  }

  async function load() {
    const r = await api("GET", "/v1/routing");
    if (r.status === 404 || r.status === 405) {
      document.getElementById("routing").replaceChildren(
        el("p", { class: "muted", "data-testid": "routing-missing" },
          "routing not available on this dispatcher"));
      return;
    }
    if (!r.ok) { showError(r.error); return; }
    showError(null);
    etag = r.headers.get("ETag") || (r.data.version !== undefined ? `"${r.data.version}"` : null);
    doc = r.data;
    render();
  }

  async function setMode(node, device, set) {
    const r = await api("POST", `/v1/nodes/${encodeURIComponent(node)}/mode`,
      { device, set: set || null });
    if (!r.ok) { showError(r.error); return; }
    showError(null);
    loadModes();
  }

  async function loadModes() {
    const r = await api("GET", "/v1/nodes");
    if (!r.ok) { showError(r.error); return; }
    const rows = [];
    for (const node of r.data.data) {
      const sets = Array.isArray(node.sets) ? node.sets.map((s) => s.name || s)
        : Object.keys(node.sets || {});
      for (const d of node.devices) {
        const current = d.status.mode || "";
        const select = el("select", { "aria-label": `mode of ${node.node_id}/${d.status.device_id}` },
          el("option", { value: "" }, "auto"),
          sets.map((s) => el("option", { value: s, selected: s === current }, `hold ${s}`)));
        rows.push(el("tr", { "data-testid": "mode-row" },
          el("td", {}, `${node.node_id}/${d.status.device_id}`),
          el("td", {}, current ? `holds ${current}` : "auto"),
          el("td", {}, select, " ", el("button", { type: "button",
            onclick: () => setMode(node.node_id, d.status.device_id, select.value) }, "set"))));
      }
    }
    document.getElementById("modes").replaceChildren(rows.length
      ? el("table", {}, el("tr", {}, el("th", {}, "device"), el("th", {}, "now"), el("th", {})),
        rows)
      : el("p", { class: "muted" }, "no node has registered yet"));
  }

  RM.setupKeyForm(() => { load(); loadModes(); });
  load();
  loadModes();
})();
