// Freshet's web console: plain JavaScript, no build step, no dependencies. Hash
// routes: #/ (overview), #/topics, #/topics/NAME. Each page renders into <main>,
// refreshes itself on a timer while shown, and stops when another page is shown.
"use strict";

const main = document.getElementById("page");
const errorBox = document.getElementById("error");
let leaving = []; // what the current page must stop (timers, event sources)

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null) node.setAttribute(k, v);
  }
  for (const c of children.flat()) node.append(c instanceof Node ? c : String(c));
  return node;
}

function showError(message) {
  errorBox.textContent = message;
  errorBox.hidden = !message;
}

async function api(path, options = {}) {
  const response = await fetch(path, options);
  const text = await response.text();
  const body = text ? JSON.parse(text) : null;
  if (!response.ok) {
    throw new Error((body && body.message) || `${response.status} ${response.statusText}`);
  }
  return body;
}

function every(ms, f) {
  let stopped = false;
  const run = async () => {
    if (stopped) return;
    try {
      await f();
      showError("");
    } catch (e) {
      showError(e.message);
    }
    if (!stopped) timer = setTimeout(run, ms);
  };
  let timer = setTimeout(run, 0);
  leaving.push(() => { stopped = true; clearTimeout(timer); });
}

const fmt = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en"));
// 1536 -> "1.5 KiB".
function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}
// retention.ms -> "7d", "1h 30m", "forever" (-1).
const retention = (ms) => (ms === null || ms === undefined ? "–" : ms < 0 ? "forever" : duration(Math.round(ms / 1000)));

function duration(s) {
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
  return d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : `${m}m ${s % 60}s`;
}

// ---- charts ------------------------------------------------------------------------

// Per-second rates of the sum of a counter's series, from /metrics/history.
async function rates(name) {
  const h = await api(`/metrics/history?name=${encodeURIComponent(name)}`);
  const sums = h.times.map((_, i) => h.series.reduce((a, s) => a + (s.values[i] ?? 0), 0));
  const out = [];
  for (let i = 1; i < sums.length; i++) {
    const dt = (h.times[i] - h.times[i - 1]) / 1000;
    out.push([h.times[i], dt > 0 ? Math.max(0, sums[i] - sums[i - 1]) / dt : 0]);
  }
  return out;
}

function lineChart(lines, unit = "/s", width = 720, height = 180) {
  const pad = 36;
  const all = lines.flatMap((l) => l.points);
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "chart");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  if (all.length < 2) {
    const t = document.createElementNS(svg.namespaceURI, "text");
    t.setAttribute("x", pad); t.setAttribute("y", height / 2);
    t.textContent = "collecting…";
    svg.append(t);
    return svg;
  }
  const t0 = Math.min(...all.map((p) => p[0])), t1 = Math.max(...all.map((p) => p[0]));
  const top = Math.max(1, ...all.map((p) => p[1]));
  const x = (t) => pad + ((t - t0) / Math.max(1, t1 - t0)) * (width - pad - 8);
  const y = (v) => height - 20 - (v / top) * (height - 30);
  for (const line of lines) {
    const path = document.createElementNS(svg.namespaceURI, "polyline");
    path.setAttribute("class", line.cls);
    path.setAttribute("points", line.points.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" "));
    svg.append(path);
  }
  const label = document.createElementNS(svg.namespaceURI, "text");
  label.setAttribute("x", 4); label.setAttribute("y", 14);
  label.textContent = fmt(Math.round(top)) + unit;
  svg.append(label);
  return svg;
}

// ---- pages ---------------------------------------------------------------------------

async function overview() {
  main.replaceChildren(el("h1", {}, "Overview"), el("div", { class: "cards", id: "cards" }),
    el("h2", {}, "Records per second"),
    el("div", { class: "legend" }, el("span", { class: "in" }, "in (produced)"), el("span", { class: "out" }, "out (fetched)")),
    el("div", { id: "chart" }));
  every(2000, async () => {
    const o = await api("/console/api/overview");
    const card = (label, value, id) => el("div", { class: "card", id }, el("div", { class: "label" }, label), el("div", { class: "value" }, value));
    document.getElementById("cards").replaceChildren(
      card("Brokers", o.brokers.map((b) => `${b.host}:${b.port}`).join(", "), "card-brokers"),
      card("Uptime", duration(o.uptime_s), "card-uptime"),
      card("Topics", fmt(o.topics), "card-topics"),
      card("Partitions", fmt(o.partitions), "card-partitions"),
      card("Size on disk", bytes(o.size_bytes), "card-size"),
      card("Pipelines", fmt(o.pipelines), "card-pipelines"));
    const [inRate, outRate] = await Promise.all([rates("freshet_topic_records_in_total"), rates("freshet_topic_records_out_total")]);
    document.getElementById("chart").replaceChildren(lineChart([{ cls: "in", points: inRate }, { cls: "out", points: outRate }]));
  });
}

async function topics() {
  let offset = 0;
  const limit = 50;
  const search = el("input", { placeholder: "filter by name", id: "topic-search", oninput: () => { offset = 0; load(); } });
  const body = el("tbody", { id: "topics-body" });
  const pager = el("span", { class: "muted", id: "topics-pager" });
  const name = el("input", { placeholder: "new topic", id: "new-topic-name", required: "" });
  const partitions = el("input", { type: "number", min: "1", value: "1", id: "new-topic-partitions", style: "width: 80px" });
  const create = el("form", {
    class: "inline", id: "create-topic",
    onsubmit: async (e) => {
      e.preventDefault();
      try {
        await api("/console/api/topics", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ name: name.value, partitions: Number(partitions.value) }) });
        name.value = "";
        await load();
      } catch (err) { showError(err.message); }
    },
  }, name, partitions, el("button", { class: "primary", type: "submit" }, "Create topic"));
  const prev = el("button", { id: "topics-prev", onclick: () => { offset = Math.max(0, offset - limit); load(); } }, "‹ Previous");
  const next = el("button", { id: "topics-next", onclick: () => { offset += limit; load(); } }, "Next ›");
  main.replaceChildren(el("h1", {}, "Topics"), create, el("form", { class: "inline", onsubmit: (e) => e.preventDefault() }, search),
    el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "Name"), el("th", { class: "num" }, "Partitions"), el("th", { class: "num" }, "Records"),
      el("th", { class: "num" }, "Size"), el("th", {}, "Retention"), el("th", { class: "num" }, "Records/s"), el("th", {}, ""))), body),
    el("div", { class: "inline" }, prev, next, pager));
  // The rate: growth of the end offsets between two loads of the page.
  let seen = new Map(), seenAt = 0;
  async function load() {
    const page = await api(`/console/api/topics?offset=${offset}&limit=${limit}&search=${encodeURIComponent(search.value)}`);
    const now = Date.now();
    const rate = (t) => (seen.has(t.name) ? Math.max(0, (t.end_offsets - seen.get(t.name)) / Math.max(0.001, (now - seenAt) / 1000)) : null);
    const rates = new Map(page.topics.map((t) => [t.name, rate(t)]));
    seen = new Map(page.topics.map((t) => [t.name, t.end_offsets]));
    seenAt = now;
    body.replaceChildren(...page.topics.map((t) => el("tr", { "data-topic": t.name },
      el("td", {}, el("a", { href: `#/topics/${encodeURIComponent(t.name)}` }, t.name)),
      el("td", { class: "num" }, fmt(t.partitions)), el("td", { class: "num" }, fmt(t.records)),
      el("td", { class: "num", "data-bytes": t.size_bytes ?? "" }, bytes(t.size_bytes)), el("td", {}, retention(t.retention_ms)),
      el("td", { class: "num" }, rates.get(t.name) === null ? "–" : fmt(Math.round(rates.get(t.name)))),
      el("td", {}, el("button", {
        class: "danger",
        onclick: async () => {
          if (!confirm(`Delete topic ${t.name} and all its records?`)) return;
          try { await api(`/console/api/topics/${encodeURIComponent(t.name)}`, { method: "DELETE" }); await load(); } catch (err) { showError(err.message); }
        },
      }, "Delete")))));
    pager.textContent = page.total ? `${fmt(offset + 1)}–${fmt(offset + page.topics.length)} of ${fmt(page.total)}` : "no topics";
    prev.disabled = offset === 0;
    next.disabled = offset + page.topics.length >= page.total;
  }
  every(5000, load);
}

async function topic(name) {
  const parts = el("tbody", { id: "partitions-body" });
  const filter = el("input", { placeholder: "filter key/value text", id: "tail-filter" });
  const tail = el("div", { class: "tail", id: "tail" });
  const key = el("input", { placeholder: "key (optional)", id: "produce-key" });
  const value = el("textarea", { rows: "3", cols: "60", id: "produce-value", placeholder: '{"field": "value"}' });
  const produced = el("span", { class: "muted", id: "produce-result" });
  const form = el("form", {
    class: "inline", id: "produce",
    onsubmit: async (e) => {
      e.preventDefault();
      try {
        const q = key.value ? `?key=${encodeURIComponent(key.value)}` : "";
        const r = await api(`/ingest/${encodeURIComponent(name)}${q}`, { method: "POST", headers: { "content-type": "application/json" }, body: value.value });
        produced.textContent = `stored at partition ${r.partition}, offset ${r.offset}`;
      } catch (err) { showError(err.message); }
    },
  }, key, value, el("button", { class: "primary", type: "submit" }, "Produce"), produced);
  const configs = el("tbody", { id: "configs-body" });
  const schema = el("pre", { class: "tail", id: "schema" }, "…");
  const searchPartition = el("input", { type: "number", min: "0", value: "0", id: "search-partition", style: "width: 70px" });
  const searchFrom = el("input", { placeholder: "offset, or a time (2026-12-07T10:00:00Z)", id: "search-from", size: "36" });
  const found = el("tbody", { id: "search-body" });
  const search = el("form", {
    class: "inline", id: "search",
    onsubmit: async (e) => {
      e.preventDefault();
      try {
        const from = searchFrom.value.trim();
        const at = /^\d+$/.test(from) ? `offset=${from}` : from ? `timestamp=${Date.parse(from)}` : "";
        if (from && !/^\d+$/.test(from) && Number.isNaN(Date.parse(from))) throw new Error(`not an offset or a time: ${from}`);
        const r = await api(`/console/api/topics/${encodeURIComponent(name)}/records?partition=${searchPartition.value}&limit=50&${at}`);
        found.replaceChildren(...r.records.map((m) => el("tr", { "data-offset": m.offset }, el("td", {}, m.offset),
          el("td", {}, m.timestamp === null ? "" : new Date(m.timestamp).toISOString()), el("td", {}, m.key ?? ""), el("td", {}, m.value ?? ""))));
        if (!r.records.length) found.replaceChildren(el("tr", {}, el("td", { colspan: "4", class: "muted" }, "no records from there")));
      } catch (err) { showError(err.message); }
    },
  }, "Partition", searchPartition, "from", searchFrom, el("button", { type: "submit" }, "Search"));
  const alter = (change) => api(`/console/api/topics/${encodeURIComponent(name)}/configs`, { method: "PUT", headers: { "content-type": "application/json" }, body: JSON.stringify(change) });
  const configRow = (e) => {
    const value = el("td", {}, e.value ?? (e.sensitive ? "(hidden)" : ""));
    const actions = el("td", {});
    const edit = () => {
      const input = el("input", { value: e.value ?? "", "data-config-input": e.name, size: "24" });
      const save = el("button", { class: "primary", "data-config-save": e.name, onclick: async () => {
        try { await alter({ set: { [e.name]: input.value } }); await loadConfigs(); } catch (err) { showError(err.message); }
      } }, "Save");
      value.replaceChildren(input);
      actions.replaceChildren(save, el("button", { "data-config-cancel": e.name, onclick: () => loadConfigs() }, "Cancel"));
      input.focus();
    };
    if (!e.read_only && !e.sensitive) actions.append(el("button", { "data-config-edit": e.name, onclick: edit }, "Edit"));
    if (!e.read_only && !e.default) actions.append(el("button", { "data-config-default": e.name, onclick: async () => {
      try { await alter({ delete: [e.name] }); await loadConfigs(); } catch (err) { showError(err.message); }
    } }, "Default"));
    return el("tr", { "data-config": e.name }, el("td", {}, e.name), value, el("td", { class: "muted" }, e.default ? "default" : "set"), actions);
  };
  async function loadConfigs() {
    try {
      const c = await api(`/console/api/topics/${encodeURIComponent(name)}/configs`);
      configs.replaceChildren(...c.configs.map(configRow));
    } catch (err) { showError(err.message); }
  }
  loadConfigs();
  main.replaceChildren(el("h1", {}, name),
    el("h2", {}, "Partitions"),
    el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "Partition"), el("th", {}, "Leader"), el("th", { class: "num" }, "Start offset"), el("th", { class: "num" }, "End offset"), el("th", { class: "num" }, "Records"))), parts),
    el("h2", {}, "Produce a record"), form,
    el("h2", {}, "Live tail"), el("form", { class: "inline", onsubmit: (e) => e.preventDefault() }, filter), tail,
    el("h2", {}, "Search"), search,
    el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "Offset"), el("th", {}, "Time"), el("th", {}, "Key"), el("th", {}, "Value"))), found),
    el("h2", {}, "JSON Schema"), schema,
    el("h2", {}, "Configs"), el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "Name"), el("th", {}, "Value"), el("th", {}, ""), el("th", {}, ""))), configs));
  every(3000, async () => {
    const t = await api(`/console/api/topics/${encodeURIComponent(name)}`);
    schema.textContent = t.schema ? JSON.stringify(t.schema, null, 2) : "No JSON Schema: any record is accepted.";
    parts.replaceChildren(...t.partitions.map((p) => el("tr", {},
      el("td", {}, p.partition), el("td", {}, p.leader), el("td", { class: "num" }, fmt(p.start)), el("td", { class: "num" }, fmt(p.end)), el("td", { class: "num" }, fmt(p.end - p.start)))));
  });
  const source = new EventSource(`/topics/${encodeURIComponent(name)}/stream?from=latest`);
  leaving.push(() => source.close());
  // Open: the stream's start is fixed; what is produced from now on shows.
  source.onopen = () => { tail.dataset.open = "true"; };
  const shown = () => {
    const f = filter.value.toLowerCase();
    for (const row of tail.children) row.hidden = !!f && !row.dataset.text.includes(f);
  };
  filter.addEventListener("input", shown);
  source.onmessage = (e) => {
    const r = JSON.parse(e.data);
    // A JSON value or key comes embedded as JSON, anything else as a string.
    const show = (v) => (v === null || v === undefined ? "" : typeof v === "string" ? v : JSON.stringify(v));
    const text = `${r.partition}:${r.offset}  ${show(r.key)}  ${show(r.value)}`;
    const row = el("div", { "data-offset": `${r.partition}:${r.offset}` }, text);
    row.dataset.text = `${show(r.key)} ${show(r.value)}`.toLowerCase();
    tail.prepend(row);
    while (tail.children.length > 500) tail.lastChild.remove();
    shown();
  };
}

async function groups() {
  const body = el("tbody", { id: "groups-body" });
  const limit = 50;
  let offset = 0;
  const search = el("input", { placeholder: "filter by name", id: "group-search", oninput: () => { offset = 0; load(); } });
  const pager = el("span", { class: "muted", id: "groups-pager" });
  const prev = el("button", { id: "groups-prev", onclick: () => { offset = Math.max(0, offset - limit); load(); } }, "‹ Previous");
  const next = el("button", { id: "groups-next", onclick: () => { offset += limit; load(); } }, "Next ›");
  main.replaceChildren(el("h1", {}, "Consumer groups"), el("form", { class: "inline", onsubmit: (e) => e.preventDefault() }, search),
    el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "Group"), el("th", {}, "State"), el("th", {}, "Type"), el("th", {}, "Assignor"), el("th", { class: "num" }, "Members"))), body),
    el("div", { class: "inline" }, prev, next, pager));
  async function load() {
    const page = await api(`/console/api/groups?offset=${offset}&limit=${limit}&search=${encodeURIComponent(search.value)}`);
    body.replaceChildren(...page.groups.map((g) => el("tr", { "data-group": g.name, title: g.error ?? "" },
      el("td", {}, el("a", { href: `#/groups/${encodeURIComponent(g.name)}` }, g.name)),
      el("td", {}, g.state || "?"), el("td", {}, g.type), el("td", {}, g.assignor ?? ""), el("td", { class: "num" }, g.members === null ? "?" : fmt(g.members)))));
    pager.textContent = page.total ? `${fmt(offset + 1)}–${fmt(offset + page.groups.length)} of ${fmt(page.total)}` : "no groups";
    prev.disabled = offset === 0;
    next.disabled = offset + page.groups.length >= page.total;
  }
  every(3000, load);
}

async function group(name) {
  const head = el("div", { class: "cards", id: "group-cards" });
  const members = el("tbody", { id: "members-body" });
  const parts = el("tbody", { id: "lag-body" });
  const chart = el("div", { id: "lag-chart" });
  main.replaceChildren(el("h1", {}, name), head,
    el("h2", {}, "Lag over time (records)"), chart,
    el("h2", {}, "Members"),
    el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "Member"), el("th", {}, "Client"), el("th", {}, "Host"), el("th", {}, "Assigned"))), members),
    el("h2", {}, "Partitions"),
    el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "Topic"), el("th", {}, "Partition"), el("th", { class: "num" }, "Committed"), el("th", { class: "num" }, "Log end"), el("th", { class: "num" }, "Lag"), el("th", { class: "num" }, "Lag (s)"))), parts));
  const resetTopic = el("input", { placeholder: "topic", id: "reset-topic" });
  const resetTo = el("input", { placeholder: "earliest, latest or an offset", id: "reset-to", value: "earliest" });
  const resetDone = el("span", { class: "muted", id: "reset-result" });
  const reset = el("form", {
    class: "inline", id: "reset",
    onsubmit: async (e) => {
      e.preventDefault();
      const to = /^-?\d+$/.test(resetTo.value.trim()) ? Number(resetTo.value.trim()) : resetTo.value.trim();
      if (!confirm(`Set the committed offsets of group ${name} on ${resetTopic.value} to ${to}?`)) return;
      try {
        const r = await api(`/console/api/groups/${encodeURIComponent(name)}/reset`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ topic: resetTopic.value, to }) });
        resetDone.textContent = "committed: " + r.offsets.map((o) => `${o.partition}→${o.offset}`).join(", ");
      } catch (err) { showError(err.message); }
    },
  }, resetTopic, "to", resetTo, el("button", { class: "danger", type: "submit" }, "Reset offsets"), resetDone,
  el("span", { class: "muted" }, " (only while the group has no members)"));
  main.append(el("h2", {}, "Reset offsets"), reset);
  const seen = []; // [time ms, total lag, total committed]
  every(2000, async () => {
    const g = await api(`/console/api/groups/${encodeURIComponent(name)}`);
    const lag = g.partitions.reduce((a, p) => a + (p.lag ?? 0), 0);
    const committed = g.partitions.reduce((a, p) => a + (p.committed ?? 0), 0);
    const now = Date.now();
    seen.push([now, lag, committed]);
    while (seen.length > 900) seen.shift();
    // Time to clear: the lag over the rate the group committed at lately.
    const first = seen.find((s) => now - s[0] <= 60000) || seen[0];
    const rate = (committed - first[2]) / Math.max(1, (now - first[0]) / 1000);
    const clear = lag === 0 ? "caught up" : rate > 0 ? duration(Math.ceil(lag / rate)) : "not moving";
    const card = (label, value, id) => el("div", { class: "card", id }, el("div", { class: "label" }, label), el("div", { class: "value" }, value));
    head.replaceChildren(card("State", g.state || "?", "group-state"), card("Members", fmt(g.members.length), "group-members"),
      card("Lag (records)", fmt(lag), "group-lag"), card("Time to clear", clear, "group-clear"));
    members.replaceChildren(...g.members.map((m) => el("tr", {}, el("td", {}, m.id), el("td", {}, m.client_id), el("td", {}, m.host),
      el("td", {}, m.assignment.map((a) => `${a.topic}:${a.partitions.join(",")}`).join(" ") || "–"))));
    parts.replaceChildren(...g.partitions.map((p) => el("tr", { "data-partition": `${p.topic}:${p.partition}` },
      el("td", {}, p.topic), el("td", {}, p.partition), el("td", { class: "num" }, p.committed ?? "–"), el("td", { class: "num" }, fmt(p.log_end)),
      el("td", { class: "num" }, p.lag ?? "–"), el("td", { class: "num" }, p.lag_seconds === null || p.lag_seconds === undefined ? "–" : p.lag_seconds.toFixed(1)))));
    chart.replaceChildren(lineChart([{ cls: "in", points: seen.map((s) => [s[0], s[1]]) }], ""));
  });
}

async function pipelines() {
  const body = el("tbody", { id: "pipelines-body" });
  const name = el("input", { placeholder: "name", id: "new-pipeline-name", required: "" });
  const sql = el("textarea", { rows: "4", cols: "80", id: "new-pipeline-sql", placeholder: "INSERT INTO out SELECT ... FROM topic;" });
  const create = el("form", {
    class: "inline", id: "create-pipeline",
    onsubmit: async (e) => {
      e.preventDefault();
      try {
        await api(`/pipelines/${encodeURIComponent(name.value)}`, { method: "PUT", headers: { "content-type": "text/plain" }, body: sql.value });
        location.hash = `#/pipelines/${encodeURIComponent(name.value)}`;
      } catch (err) { showError(err.message); }
    },
  }, name, sql, el("button", { class: "primary", type: "submit" }, "Create pipeline"));
  main.replaceChildren(el("h1", {}, "Pipelines"),
    el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "Pipeline"), el("th", {}, "Status"), el("th", { class: "num" }, "Records in"), el("th", { class: "num" }, "Rows out"), el("th", { class: "num" }, "Source lag"))), body),
    el("h2", {}, "New pipeline"), create);
  every(2000, async () => {
    const list = await api("/pipelines");
    body.replaceChildren(...list.map((p) => el("tr", { "data-pipeline": p.name },
      el("td", {}, el("a", { href: `#/pipelines/${encodeURIComponent(p.name)}` }, p.name)), el("td", {}, p.status),
      el("td", { class: "num" }, fmt(p.records_in)), el("td", { class: "num" }, fmt(p.records_out)), el("td", { class: "num" }, fmt(p.source_lag)))));
  });
}

async function pipeline(name) {
  const head = el("div", { class: "cards", id: "pipeline-cards" });
  const sqlText = el("pre", { id: "pipeline-sql", class: "tail" });
  const results = el("table", { id: "results" });
  const column = el("select", { id: "chart-column" });
  const chart = el("div", { id: "results-chart" });
  const remove = el("button", {
    class: "danger", id: "delete-pipeline",
    onclick: async () => {
      if (!confirm(`Delete pipeline ${name}? Its output topics stay.`)) return;
      try { await api(`/pipelines/${encodeURIComponent(name)}`, { method: "DELETE" }); location.hash = "#/pipelines"; } catch (err) { showError(err.message); }
    },
  }, "Delete");
  // Pause keeps the definition and stops every run (its groups left); resume goes
  // on from the checkpoints.
  const toggle = el("button", {
    id: "pause-pipeline",
    onclick: async () => {
      const action = toggle.dataset.paused === "true" ? "resume" : "pause";
      try {
        const p = await api(`/pipelines/${encodeURIComponent(name)}/${action}`, { method: "PUT" });
        showPaused(p.status === "paused");
      } catch (err) { showError(err.message); }
    },
  }, "Pause");
  const showPaused = (paused) => { toggle.dataset.paused = String(paused); toggle.textContent = paused ? "Resume" : "Pause"; };
  main.replaceChildren(el("h1", {}, name, " ", toggle, " ", remove), head, el("h2", {}, "SQL"), sqlText,
    el("h2", {}, "Live results"), el("div", { class: "inline" }, "Chart of ", column, " over windows"), chart, results);
  const card = (label, value, id) => el("div", { class: "card", id }, el("div", { class: "label" }, label), el("div", { class: "value" }, value));
  let last = null;
  let source = null;
  const rows = new Map(); // record key -> row
  const draw = () => {
    const all = [...rows.values()];
    const columns = [...new Set(all.flatMap((r) => Object.keys(r)))];
    results.replaceChildren(el("thead", {}, el("tr", {}, columns.map((c) => el("th", {}, c)))),
      el("tbody", { id: "results-body" }, all.slice(-200).reverse().map((r) => el("tr", {}, columns.map((c) => el("td", {}, r[c] === undefined ? "" : typeof r[c] === "object" ? JSON.stringify(r[c]) : r[c]))))));
    const numeric = columns.filter((c) => all.some((r) => typeof r[c] === "number") && c !== "window_start" && c !== "window_end");
    const chosen = column.value;
    column.replaceChildren(...numeric.map((c) => el("option", { value: c }, c)));
    if (numeric.includes(chosen)) column.value = chosen;
    const c = column.value;
    const byWindow = new Map();
    for (const r of all) {
      if (typeof r[c] !== "number" || r.window_start === undefined) continue;
      byWindow.set(r.window_start, (byWindow.get(r.window_start) || 0) + r[c]);
    }
    chart.replaceChildren(all.some((r) => r.window_start !== undefined)
      ? lineChart([{ cls: "in", points: [...byWindow.entries()].sort((a, b) => a[0] - b[0]) }], "")
      : el("p", { class: "muted" }, "The query has no windows: the table below is its current result."));
  };
  column.addEventListener("change", draw);
  every(2000, async () => {
    const p = await api(`/pipelines/${encodeURIComponent(name)}`);
    const now = Date.now();
    const rate = last ? ((p.records_in - last.records_in) / Math.max(0.001, (now - last.at) / 1000)) : 0;
    last = { records_in: p.records_in, at: now };
    showPaused(p.status === "paused");
    head.replaceChildren(card("Status", p.status, "pipeline-status"), card("Records in", fmt(p.records_in), "pipeline-in"),
      card("Records/s", fmt(Math.round(rate)), "pipeline-rate"), card("Rows out", fmt(p.records_out), "pipeline-out"),
      card("Watermark", p.watermark ? new Date(p.watermark).toISOString().replace(".000Z", "Z") : "–", "pipeline-watermark"),
      card("Late", fmt(p.late), "pipeline-late"), card("Dead-lettered", fmt(p.dead_lettered), "pipeline-dead"),
      card("State", fmt(p.state_bytes) + " B", "pipeline-state"));
    if (p.last_error) showError(p.last_error);
    sqlText.textContent = p.sql;
    const output = (p.outputs || [])[0];
    if (output && !source) {
      source = new EventSource(`/topics/${encodeURIComponent(output)}/stream?from=earliest`);
      leaving.push(() => source.close());
      source.onmessage = (e) => {
        const r = JSON.parse(e.data);
        const row = typeof r.value === "object" && r.value !== null ? r.value : { value: r.value };
        rows.set(r.key === null || r.key === undefined ? `${r.partition}:${r.offset}` : JSON.stringify(r.key), row);
        while (rows.size > 5000) rows.delete(rows.keys().next().value);
        draw();
      };
    }
  });
}

// The sum over a metric's series per time, from /metrics/history.
async function sums(name) {
  const h = await api(`/metrics/history?name=${encodeURIComponent(name)}`);
  return h.times.map((t, i) => [t, h.series.reduce((a, s) => a + (s.values[i] ?? 0), 0)]);
}

async function gatewayPage() {
  const head = el("div", { class: "cards", id: "gateway-cards" });
  const charts = el("div", { id: "gateway-charts" });
  main.replaceChildren(el("h1", {}, "Gateway"), head, charts);
  const card = (label, value, id) => el("div", { class: "card", id }, el("div", { class: "label" }, label), el("div", { class: "value" }, value));
  every(2000, async () => {
    const [health, requests, spool, age, durSum, durCount] = await Promise.all([api("/health"), rates("freshet_http_requests_total"),
      sums("freshet_gateway_spool_records"), sums("freshet_gateway_spool_oldest_age_seconds"),
      sums("freshet_http_request_duration_seconds_sum"), sums("freshet_http_request_duration_seconds_count")]);
    // Mean latency per interval: the seconds spent over the requests answered.
    const latency = [];
    for (let i = 1; i < durSum.length; i++) {
      const n = durCount[i][1] - durCount[i - 1][1];
      if (n > 0) latency.push([durSum[i][0], ((durSum[i][1] - durSum[i - 1][1]) / n) * 1000]);
    }
    head.replaceChildren(card("Cluster", health.cluster, "gateway-cluster"), card("Outage mode", health.outage_mode ? "yes" : "no", "gateway-outage"),
      card("Spool records", fmt(health.spool.records), "gateway-spool"), card("Spool age", health.spool.oldest_age_ms === null ? "–" : `${(health.spool.oldest_age_ms / 1000).toFixed(1)} s`, "gateway-spool-age"),
      card("Stream subscribers", fmt(health.streams.subscribers), "gateway-subscribers"));
    charts.replaceChildren(el("h2", {}, "Requests per second"), lineChart([{ cls: "in", points: requests }]),
      el("h2", {}, "Mean latency (ms)"), lineChart([{ cls: "in", points: latency }], " ms"),
      el("h2", {}, "Spool depth (records) and oldest age (s)"), lineChart([{ cls: "in", points: spool }, { cls: "out", points: age }], ""));
  });
}

// ---- routing -------------------------------------------------------------------------

function route() {
  for (const stop of leaving) stop();
  leaving = [];
  showError("");
  const hash = location.hash.replace(/^#/, "") || "/";
  const parts = hash.split("/").filter(Boolean).map(decodeURIComponent);
  let page = "overview";
  if (parts[0] === "topics" && parts[1]) { page = "topics"; topic(parts[1]); }
  else if (parts[0] === "topics") { page = "topics"; topics(); }
  else if (parts[0] === "groups" && parts[1]) { page = "groups"; group(parts[1]); }
  else if (parts[0] === "groups") { page = "groups"; groups(); }
  else if (parts[0] === "pipelines" && parts[1]) { page = "pipelines"; pipeline(parts[1]); }
  else if (parts[0] === "pipelines") { page = "pipelines"; pipelines(); }
  else if (parts[0] === "gateway") { page = "gateway"; gatewayPage(); }
  else overview();
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.page === page);
}

window.addEventListener("hashchange", route);
route();
