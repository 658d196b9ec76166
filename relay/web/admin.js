// Backhaul relay status page: polls GET /v1/admin/overview every two seconds with the admin's
// API token, kept in sessionStorage (this tab only). Every value is written with textContent.
"use strict";

const TOKEN_KEY = "backhaul.admin.token";
const REFRESH_MS = 2000;
let timer = null;
const previous = new Map(); // member id -> {total, at}: requests per minute from the deltas

const $ = (id) => document.getElementById(id);

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function show(signedIn) {
  $("signin").hidden = signedIn;
  $("dashboard").hidden = !signedIn;
  $("signout").hidden = !signedIn;
}

function memberState(m) {
  if (m.revoked) return "revoked";
  if (m.disabled) return "disabled";
  if (!m.online) return "offline";
  if (m.draining) return "draining";
  return "online";
}

function ago(iso) {
  if (!iso) return "–";
  const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (seconds < 90) return `${Math.round(seconds)} s ago`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
  return new Date(iso).toLocaleString();
}

function perMinute(m) {
  const now = Date.now();
  const last = previous.get(m.id);
  previous.set(m.id, { total: m.total, at: now, online: m.online });
  if (!m.online) return "–";
  if (!last || !last.online || m.total < last.total || now <= last.at) return "…";
  return Math.round(((m.total - last.total) * 60000) / (now - last.at));
}

function render(doc) {
  $("instance").textContent = `instance ${doc.instance} · version ${doc.version}`;
  let online = 0, members = 0, rpm = 0, epm = 0;
  const body = $("members").tBodies[0];
  const rows = [];
  for (const g of doc.gateways) {
    rpm += g.requests_per_minute;
    epm += g.errors_per_minute;
    const head = el("tr", null, "gateway");
    head.dataset.gatewayId = g.id;
    const name = el("td");
    name.append(el("span", g.name), el("span", `  ${g.id} · ${g.load_balancing}`, "muted"));
    head.append(name, el("td"), el("td"), el("td"), el("td"), el("td"),
      el("td", g.requests_per_minute, "num"), el("td"));
    rows.push(head);
    for (const m of g.members) {
      members += 1;
      const state = memberState(m);
      if (state === "online" || state === "draining") online += 1;
      const row = el("tr", null, "member");
      row.dataset.memberId = m.id;
      row.dataset.state = state;
      const who = el("td");
      who.append(el("span", m.name), el("span", m.hostname ? `  ${m.hostname}` : "", "muted"));
      const badgeCell = el("td");
      badgeCell.append(el("span", state, `badge state-${state}`));
      row.append(who, badgeCell, el("td", m.version || "–"),
        el("td", m.rtt_ms === null ? "–" : `${m.rtt_ms.toFixed(1)} ms`, "num"),
        el("td", m.online ? m.inflight : "–", "num"), el("td", m.online ? m.total : "–", "num"),
        el("td", perMinute(m), "num"), el("td", m.online ? "now" : ago(m.last_seen_at)));
      rows.push(row);
    }
  }
  body.replaceChildren(...rows);
  $("no-gateways").hidden = doc.gateways.length > 0;
  $("n-gateways").textContent = doc.gateways.length;
  $("n-online").textContent = `${online} / ${members}`;
  $("n-rpm").textContent = rpm;
  $("n-epm").textContent = epm;

  const errors = doc.recent_errors.slice(0, 20).map((e) => {
    const row = el("tr");
    const problem = el("td");
    problem.append(el("strong", e.title || "error"), el("span", e.detail ? ` ${e.detail}` : ""));
    row.append(el("td", new Date(e.at).toLocaleTimeString()), el("td", e.status, "num"),
      el("td", e.gateway_name || e.connection_id), problem);
    return row;
  });
  $("errors").tBodies[0].replaceChildren(...errors);
  $("no-errors").hidden = errors.length > 0;
  $("updated").textContent = `updated ${new Date().toLocaleTimeString()} · refreshes every 2 s`;
  document.body.dataset.updated = String(Date.now());
}

async function refresh() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) { show(false); return; }
  try {
    const response = await fetch("/v1/admin/overview", {
      headers: { Authorization: `Bearer ${token}` }, cache: "no-store",
    });
    if (response.status === 401 || response.status === 403) {
      sessionStorage.removeItem(TOKEN_KEY);
      $("signin-error").textContent = response.status === 403
        ? "This token is not an admin's." : "The relay does not accept this token.";
      show(false);
      return;
    }
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    render(await response.json());
    $("conn-error").textContent = "";
    show(true);
  } catch (err) {
    $("conn-error").textContent = `· cannot reach the relay (${err.message})`;
  } finally {
    clearTimeout(timer);
    if (sessionStorage.getItem(TOKEN_KEY)) timer = setTimeout(refresh, REFRESH_MS);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("signin-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("token").value.trim();
    $("token").value = "";
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    $("signin-error").textContent = "";
    refresh();
  });
  $("signout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    clearTimeout(timer);
    show(false);
  });
  refresh();
});
