// The node's page. It talks to this node only, over the node's own
// WebSocket, with the same ops any client uses:
//   - `info` with {"detail": true} every REFRESH_MS: identity, live
//     connections, known peers with their dial state, and the topology;
//   - `subscribe` for the topics chosen in the page, one subscription each,
//     with a key id and a signer when given: gossip messages arrive as
//     {"event": "message", ...} pushes, decrypted by the node for a
//     subscription with a key, and the feed shows how each was sealed
//     ("encrypted"), who signed it ("from") and its proof of work ("pow");
//   - `publish`, with the private-message fields (key, to, sign, pow) filled in;
//   - `chain` {"recent": 8} with each refresh when `info` lists the chain
//     plugin (foxnode.plugins.chain): the head and the last blocks, and a
//     button that sends `mine`;
//   - the "Send an op" console uses a WebSocket of its own and sends exactly
//     what was typed, as the lab did with an online WebSocket tester.
// Everything that comes from the network is put on the page as text
// (textContent, setAttribute): never as HTML.
"use strict";
(function () {
  const REFRESH_MS = 1500;
  const CALL_TIMEOUT_MS = 10000;
  const FEED_MAX = 200;
  const LOG_MAX = 40;
  const SVG_NS = "http://www.w3.org/2000/svg";
  const WS_URL = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws";

  const $ = (id) => document.getElementById(id);

  // -- small DOM helpers ------------------------------------------------------

  // el("li", {class: "x", "data-id": id}, "text", child, ...): strings become
  // text nodes, so no markup from the network is ever parsed.
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== undefined && v !== null) node.setAttribute(k, String(v));
    }
    for (const c of children) {
      if (c === undefined || c === null) continue;
      node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    }
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    return node;
  }

  // Set text only when it changed: keeps selections and avoids layout work.
  function setText(node, value) {
    const s = String(value);
    if (node.textContent !== s) node.textContent = s;
  }

  function setAttr(node, name, value) {
    const s = String(value);
    if (node.getAttribute(name) !== s) node.setAttribute(name, s);
  }

  // Make `container`'s children the elements for `items`, in order, reusing
  // the element of each key (data-key). `build(item)` makes a new element,
  // `fill(node, item)` brings one up to date. Children without a key (the
  // first server-rendered paint, "none yet") are removed.
  function syncList(container, items, keyOf, build, fill, emptyText) {
    const old = new Map();
    for (const child of Array.from(container.children)) {
      const k = child.dataset.key;
      if (k !== undefined) old.set(k, child); else child.remove();
    }
    let cursor = container.firstElementChild;
    for (const item of items) {
      const key = keyOf(item);
      let node = old.get(key);
      if (node) old.delete(key); else { node = build(item); node.dataset.key = key; }
      fill(node, item);
      if (node === cursor) cursor = cursor.nextElementSibling;
      else container.insertBefore(node, cursor);
    }
    for (const node of old.values()) node.remove();
    if (!items.length && emptyText) {
      const tag = container.tagName === "TBODY" ? "tr" : "li";
      const empty = el(tag, { class: "empty" });
      if (tag === "tr") empty.appendChild(el("td", { colspan: 3 }, emptyText));
      else empty.textContent = emptyText;
      container.appendChild(empty);
    }
  }

  function short(id, n) {
    if (typeof id !== "string" || !id) return "?";
    n = n || 12;
    return id.length > n ? id.slice(0, n) + "…" : id;
  }

  function duration(seconds) {
    let s = Math.max(0, Math.floor(seconds));
    const d = Math.floor(s / 86400); s -= d * 86400;
    const h = Math.floor(s / 3600); s -= h * 3600;
    const m = Math.floor(s / 60); s -= m * 60;
    if (d) return d + "d " + h + "h " + m + "m";
    if (h) return h + "h " + m + "m " + s + "s";
    if (m) return m + "m " + s + "s";
    return s + "s";
  }

  function clock(unixSeconds) {
    const t = typeof unixSeconds === "number" ? new Date(unixSeconds * 1000) : new Date();
    return t.toLocaleTimeString([], { hour12: false });
  }

  function asJson(value, pretty) {
    try { return JSON.stringify(value, null, pretty ? 2 : 0); } catch (e) { return String(value); }
  }

  // -- the page's connection to the node -------------------------------------

  // One WebSocket, reopened with growing, jittered delays when it drops.
  // `call(op, args)` resolves with the reply object; `onEvent` gets pushes.
  class NodeLink {
    constructor(url, handlers) {
      this.url = url;
      this.handlers = handlers;
      this.ws = null;
      this.nextId = 1;
      this.pending = new Map();
      this.delay = 500;
      this.connect();
    }

    get open() { return this.ws !== null && this.ws.readyState === WebSocket.OPEN; }

    connect() {
      this.handlers.onState("connecting");
      let ws;
      try { ws = new WebSocket(this.url); } catch (e) { this.retry(); return; }
      this.ws = ws;
      ws.onopen = () => { this.delay = 500; this.handlers.onState("live"); this.handlers.onOpen(); };
      ws.onmessage = (m) => this.received(m.data);
      ws.onclose = (e) => {
        if (this.ws !== ws) return;
        this.ws = null;
        this.failAll("connection closed");
        this.retry(e.code, e.reason);
      };
      ws.onerror = () => { /* onclose follows */ };
    }

    retry(code, reason) {
      const wait = Math.round(this.delay * (0.8 + 0.4 * Math.random()));
      this.delay = Math.min(this.delay * 2, 10000);
      this.handlers.onState("closed", { wait: wait, code: code, reason: reason });
      setTimeout(() => this.connect(), wait);
    }

    failAll(why) {
      for (const p of this.pending.values()) { clearTimeout(p.timer); p.reject(new Error(why)); }
      this.pending.clear();
    }

    received(data) {
      let msg;
      try { msg = JSON.parse(data); } catch (e) { return; }
      if (msg === null || typeof msg !== "object") return;
      if (typeof msg.event === "string" && msg.status === undefined) { this.handlers.onEvent(msg); return; }
      const p = this.pending.get(msg.id);
      if (p) { this.pending.delete(msg.id); clearTimeout(p.timer); p.resolve(msg); }
    }

    call(op, args) {
      return new Promise((resolve, reject) => {
        if (!this.open) { reject(new Error("not connected")); return; }
        const id = "page-" + this.nextId++;
        const timer = setTimeout(() => {
          this.pending.delete(id);
          reject(new Error("no reply to " + op + " within " + CALL_TIMEOUT_MS / 1000 + " s"));
        }, CALL_TIMEOUT_MS);
        this.pending.set(id, { resolve: resolve, reject: reject, timer: timer });
        const msg = { op: op, id: id };
        if (args !== undefined) msg.args = args;
        this.ws.send(JSON.stringify(msg));
      });
    }
  }

  // -- state -----------------------------------------------------------------

  let selfId = $("node-id").textContent.trim();
  let uptime = null;             // [seconds at the last info, performance.now() then]
  //: subscription key (topic, key id, signer) -> {topic, key, from, sid, state}
  const wanted = new Map();
  const seenMessages = new Set();
  let feedCount = 0;

  // -- identity --------------------------------------------------------------

  function showConnectionState(state, detail) {
    const node = $("ws-state");
    setAttr(node, "data-state", state);
    document.body.dataset.ws = state;
    // Subscriptions live on the connection: they are made again on reopening.
    if (state !== "live") { for (const s of wanted.values()) { s.state = "pending"; s.sid = null; } renderTopics(); }
    if (state === "live") setText(node, "live");
    else if (state === "connecting") setText(node, "connecting…");
    else {
      const why = detail && detail.code && detail.code !== 1006 ? " (" + detail.code +
        (detail.reason ? ": " + detail.reason : "") + ")" : "";
      setText(node, "disconnected" + why + ", retrying in " + (detail.wait / 1000).toFixed(1) + " s");
    }
  }

  function renderUptime() {
    if (!uptime) return;
    const seconds = uptime[0] + (performance.now() - uptime[1]) / 1000;
    setText($("uptime"), duration(seconds));
    setText($("uptime-banner"), duration(seconds));
  }

  function renderIdentity(info) {
    selfId = info.node_id;
    setText($("node-id"), info.node_id);
    setText($("network"), info.network);
    setText($("network-banner"), info.network);
    setText($("version"), info.version);
    setText($("protocol"), info.protocol !== undefined ? "(protocol " + info.protocol + ")" : "");
    setText($("listen"), info.listen || "–");
    document.title = "FOXCHAIN node " + short(info.node_id, 16) + " (" + info.network + ")";
    uptime = [Number(info.uptime) || 0, performance.now()];
    renderUptime();
  }

  // -- live connections ------------------------------------------------------

  function renderConnections(list) {
    setText($("connected-count"), list.length);
    setText($("summary-connected"), list.length);
    syncList($("connected"), list, (c) => c.node_id + " " + c.direction,
      () => el("tr", {}, el("td", {}, el("code", { class: "id" })), el("td", {}, el("code", { class: "addr" })),
        el("td", { class: "direction" })),
      (tr, c) => {
        setAttr(tr, "data-node-id", c.node_id);
        setAttr(tr, "data-direction", c.direction);
        const [id, addr, dir] = tr.children;
        setText(id.firstChild, short(c.node_id, 16));
        setAttr(id.firstChild, "title", c.node_id);
        setText(addr.firstChild, c.addr || "–");
        const way = c.direction === "in" ? "← in" : c.direction === "out" ? "→ out" : String(c.direction);
        setText(dir, c.kind ? way + " · " + (KIND_LABEL[c.kind] || String(c.kind)) : way);
        if (c.kind) setAttr(tr, "data-kind", c.kind); else tr.removeAttribute("data-kind");
      }, "none yet");
  }

  // -- known peers -----------------------------------------------------------

  const STATE_ORDER = ["connected", "handshaking", "dialing", "backoff", "failing", "idle", "self"];
  const STATE_LABEL = {
    connected: "connected", handshaking: "saying hello", dialing: "dialing", backoff: "backing off",
    failing: "failing", idle: "idle", self: "this node",
  };
  const KIND_LABEL = { static: "static peer", trusted: "trusted peer" };
  const SOURCE_LABEL = {
    bootstrap: "--peer bootstrap", register: "registered", exchange: "learned from a peer",
    handshake: "announced in its hello", self: "its own address",
  };

  function renderPeers(list) {
    // `peers` op fallback gives plain addresses; `info` detail gives records.
    const records = list.map((p) => (typeof p === "string" ? { addr: p, state: "unknown" } : p));
    const rank = (s) => { const i = STATE_ORDER.indexOf(s); return i < 0 ? STATE_ORDER.length : i; };
    records.sort((a, b) => rank(a.state) - rank(b.state) || String(a.addr).localeCompare(String(b.addr)));
    setText($("peer-count"), records.length);
    setText($("summary-known"), records.length);
    const counts = {};
    for (const r of records) counts[r.state] = (counts[r.state] || 0) + 1;
    setText($("peer-summary"), STATE_ORDER.filter((s) => counts[s])
      .map((s) => counts[s] + " " + STATE_LABEL[s]).join(" · "));

    syncList($("peers"), records, (r) => String(r.addr),
      () => el("li", {},
        el("span", { class: "badge" }),
        el("code", { class: "addr" }),
        el("span", { class: "meta small muted" }),
        el("span", { class: "why small" })),
      (li, r) => {
        const [badge, addr, meta, why] = li.children;
        setAttr(li, "data-state", r.state);
        setAttr(li, "data-addr", r.addr);
        if (r.node_id) setAttr(li, "data-node-id", r.node_id); else li.removeAttribute("data-node-id");
        setAttr(badge, "class", "badge state-" + r.state);
        setText(badge, STATE_LABEL[r.state] || String(r.state));
        setText(addr, r.addr);
        const bits = [];
        if (r.node_id) bits.push("node " + short(r.node_id, 12));
        if (r.kind) bits.push(KIND_LABEL[r.kind] || String(r.kind));
        if (r.kind) setAttr(li, "data-kind", r.kind); else li.removeAttribute("data-kind");
        if (r.source) bits.push(SOURCE_LABEL[r.source] || String(r.source));
        if (r.failures) bits.push(r.failures + (r.failures === 1 ? " failure" : " failures") + " in a row");
        setText(meta, bits.join(" · "));
        setAttr(meta, "title", r.node_id || "");
        const reasons = [];
        if (r.last_error && r.state !== "connected") reasons.push("last error: " + r.last_error);
        if (typeof r.retry_in === "number" && r.state !== "connected") reasons.push("retry in " + r.retry_in.toFixed(1) + " s");
        setText(why, reasons.join(" · "));
        why.hidden = reasons.length === 0;
      }, "none yet");
  }

  // -- the network picture ---------------------------------------------------

  // A small force-directed layout (Fruchterman-Reingold), rerun only when
  // the set of nodes or links changes, starting from the previous positions
  // so the picture moves as little as possible. Elements are kept per node
  // id and per link, so an update adds, moves or removes only what changed.
  const W = 480, H = 320, MARGIN = 34;
  const MAX_DRAWN = 150;
  const graphNodes = new Map();   // id -> <g>
  const graphLinks = new Map();   // "a b" -> <line>
  let layoutKey = "";
  let positions = new Map();      // id -> [x, y] in layout space

  // A stable pseudo-random number in [0, 1) per string: the same network
  // gives the same picture on every load.
  function hashUnit(s, salt) {
    let h = 2166136261 ^ salt;
    for (let i = 0; i < s.length; i++) { h ^= s.charCodeAt(i); h = Math.imul(h, 16777619); }
    return ((h >>> 0) % 100000) / 100000;
  }

  function layout(me, nodes, links) {
    const n = nodes.length;
    const k = Math.sqrt((W * H) / Math.max(n, 1)) * 0.6;
    const adj = new Map(nodes.map((id) => [id, []]));
    for (const [a, b] of links) { adj.get(a).push(b); adj.get(b).push(a); }
    const pos = new Map();
    for (const id of nodes) {
      const old = positions.get(id);
      if (old) { pos.set(id, [old[0], old[1]]); continue; }
      // New: next to a neighbour already placed, else on a circle.
      const near = adj.get(id).map((m) => positions.get(m)).find((p) => p);
      const a = 2 * Math.PI * hashUnit(id, 1);
      const r = near ? k * 0.5 : Math.min(W, H) * 0.35 * (id === me ? 0 : 1);
      const base = near || [W / 2, H / 2];
      pos.set(id, [base[0] + r * Math.cos(a), base[1] + r * Math.sin(a)]);
    }
    const ids = nodes.slice();
    const iterations = n > 60 ? 80 : 200;
    let temp = W / 8;
    for (let it = 0; it < iterations; it++) {
      const disp = new Map(ids.map((id) => [id, [0, 0]]));
      for (let i = 0; i < n; i++) {
        const pi = pos.get(ids[i]), di = disp.get(ids[i]);
        for (let j = i + 1; j < n; j++) {
          const pj = pos.get(ids[j]), dj = disp.get(ids[j]);
          let dx = pi[0] - pj[0], dy = pi[1] - pj[1];
          let d2 = dx * dx + dy * dy;
          if (d2 < 0.01) { dx = hashUnit(ids[i] + ids[j], it) - 0.5; dy = 0.5; d2 = dx * dx + dy * dy; }
          const f = (k * k) / d2;
          di[0] += dx * f; di[1] += dy * f; dj[0] -= dx * f; dj[1] -= dy * f;
        }
      }
      for (const [a, b] of links) {
        const pa = pos.get(a), pb = pos.get(b);
        const dx = pa[0] - pb[0], dy = pa[1] - pb[1];
        const d = Math.sqrt(dx * dx + dy * dy) || 0.01;
        const f = d / k;
        disp.get(a)[0] -= dx * f; disp.get(a)[1] -= dy * f;
        disp.get(b)[0] += dx * f; disp.get(b)[1] += dy * f;
      }
      for (const id of ids) {
        const p = pos.get(id), dp = disp.get(id);
        // A little gravity keeps pieces the node cannot link together near.
        dp[0] += (W / 2 - p[0]) * 0.02 * k / 10; dp[1] += (H / 2 - p[1]) * 0.02 * k / 10;
        const len = Math.sqrt(dp[0] * dp[0] + dp[1] * dp[1]) || 1;
        const step = Math.min(len, temp);
        p[0] += (dp[0] / len) * step; p[1] += (dp[1] / len) * step;
      }
      temp = Math.max(temp * 0.975, 0.5);
    }
    positions = pos;
  }

  // Layout space to the picture: centre the bounding box and scale it to
  // fit (never enlarging a small network past a comfortable spacing).
  function fitted() {
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const [x, y] of positions.values()) {
      x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x); y1 = Math.max(y1, y);
    }
    const w = Math.max(x1 - x0, 1), h = Math.max(y1 - y0, 1);
    const s = Math.min((W - 2 * MARGIN) / w, (H - 2 * MARGIN) / h, 3);
    const ox = W / 2 - ((x0 + x1) / 2) * s, oy = H / 2 - ((y0 + y1) / 2) * s;
    const out = new Map();
    for (const [id, [x, y]] of positions) out.set(id, [ox + x * s, oy + y * s]);
    return out;
  }

  function renderGraph(me, topology, connected) {
    const root = $("graph");
    const peerIds = new Set(connected.map((c) => c.node_id));
    const all = new Set(Array.isArray(topology.nodes) ? topology.nodes.filter((n) => typeof n === "string") : []);
    all.add(me);
    let links = (Array.isArray(topology.links) ? topology.links : [])
      .filter((l) => Array.isArray(l) && l.length === 2 && l[0] !== l[1] && all.has(l[0]) && all.has(l[1]));
    // A big network: draw this node, its peers, then the nodes seen most often.
    let nodes = Array.from(all);
    if (nodes.length > MAX_DRAWN) {
      const degree = new Map();
      for (const [a, b] of links) { degree.set(a, (degree.get(a) || 0) + 1); degree.set(b, (degree.get(b) || 0) + 1); }
      const rank = (n) => (n === me ? 0 : peerIds.has(n) ? 1 : 2);
      nodes.sort((a, b) => rank(a) - rank(b) || (degree.get(b) || 0) - (degree.get(a) || 0) || (a < b ? -1 : 1));
      nodes = nodes.slice(0, MAX_DRAWN);
      const drawn = new Set(nodes);
      links = links.filter(([a, b]) => drawn.has(a) && drawn.has(b));
    }
    const drawnSet = new Set(nodes);
    const addrOf = new Map(connected.map((c) => [c.node_id, c.addr]));
    const key = nodes.slice().sort().join(",") + "|" + links.map((l) => l.slice().sort().join(" ")).sort().join(",");
    if (key !== layoutKey) { layout(me, nodes, links); layoutKey = key; }
    const pos = fitted();
    const many = nodes.length > 24;
    const radius = many ? 6 : 10;

    const linkLayer = $("graph-links");
    const wantLinks = new Set();
    for (const [a, b] of links) {
      const key = a < b ? a + " " + b : b + " " + a;
      wantLinks.add(key);
      let line = graphLinks.get(key);
      if (!line) {
        line = svg("line", { "data-link": key, class: "new" });
        linkLayer.appendChild(line);
        graphLinks.set(key, line);
      }
      const [x1, y1] = pos.get(a), [x2, y2] = pos.get(b);
      setAttr(line, "x1", x1.toFixed(1)); setAttr(line, "y1", y1.toFixed(1));
      setAttr(line, "x2", x2.toFixed(1)); setAttr(line, "y2", y2.toFixed(1));
      setAttr(line, "data-direct", a === me || b === me ? "yes" : "no");
    }
    for (const [key, line] of graphLinks) {
      if (!wantLinks.has(key)) { line.remove(); graphLinks.delete(key); }
    }

    const nodeLayer = $("graph-nodes");
    for (const id of nodes) {
      let g = graphNodes.get(id);
      if (!g) {
        g = svg("g", { class: "node new" });
        const c = svg("circle", { r: radius, "data-node-id": id });
        const t = svg("text", { class: "label" });
        const title = svg("title", {});
        g.append(c, t, title);
        nodeLayer.appendChild(g);
        graphNodes.set(id, g);
      }
      const [circle, label, title] = g.children;
      const role = id === me ? "self" : peerIds.has(id) ? "peer" : "seen";
      const [x, y] = pos.get(id);
      setAttr(g, "transform", "translate(" + x.toFixed(1) + " " + y.toFixed(1) + ")");
      setAttr(g, "data-role", role);
      setAttr(circle, "class", role);
      setAttr(circle, "data-role", role);
      setAttr(circle, "r", role === "self" ? radius + 3 : radius);
      setText(label, many && role === "seen" ? "" : role === "self" ? "this node" : short(id, 8));
      setAttr(label, "y", radius + (role === "self" ? 15 : 12));
      const addr = addrOf.get(id);
      setText(title, id + (role === "self" ? " (this node)" : "") + (addr ? "\n" + addr : ""));
    }
    for (const [id, g] of graphNodes) {
      if (!drawnSet.has(id)) { g.remove(); graphNodes.delete(id); }
    }
    setTimeout(() => root.querySelectorAll(".new").forEach((n) => n.classList.remove("new")), 600);
    setAttr(root, "data-nodes", nodes.length);
    setAttr(root, "data-links", links.length);
    setText($("graph-summary"), (all.size > nodes.length ? "showing " + nodes.length + " of " : "") +
      all.size + (all.size === 1 ? " node, " : " nodes, ") + links.length + (links.length === 1 ? " link" : " links"));
  }

  // -- refresh ---------------------------------------------------------------

  async function refresh() {
    if (!link.open) return;
    try {
      const reply = await link.call("info", { detail: true });
      if (reply.status !== 200 || !reply.response) return;
      const info = reply.response;
      const connected = Array.isArray(info.connected) ? info.connected : [];
      renderIdentity(info);
      renderConnections(connected);
      const topology = info.topology || {
        nodes: [info.node_id].concat(connected.map((c) => c.node_id)),
        links: connected.map((c) => [info.node_id, c.node_id]),
      };
      renderGraph(info.node_id, topology, connected);
      if (Array.isArray(info.plugins) && info.plugins.includes("chain")) {
        await refreshChain();
      }
      if (Array.isArray(info.peers)) {
        renderPeers(info.peers);
      } else {
        const peers = await link.call("peers");
        if (peers.status === 200 && peers.response) renderPeers(peers.response.peers || []);
      }
    } catch (e) {
      /* the connection dropped; it reopens by itself and refreshes then */
    }
  }

  // -- foxchain (when the chain plugin is loaded) -----------------------------

  async function refreshChain() {
    const reply = await link.call("chain", { recent: 8 });
    if (reply.status !== 200 || !reply.response) return;
    const head = reply.response;
    $("foxchain").hidden = false;
    setText($("chain-height"), String(head.height));
    setText($("chain-hash"), String(head.hash));
    setText($("chain-work"), String(head.work));
    const blocks = Array.isArray(head.blocks) ? head.blocks : [];
    syncList($("chain-blocks"), blocks, (b) => String(b.hash),
      () => el("tr", {}, el("td"), el("td", {}, el("code")), el("td"), el("td")),
      (row, b) => {
        const cells = row.children;
        setText(cells[0], String(b.height));
        setText(cells[1].firstChild, short(String(b.hash), 16));
        setText(cells[2], b.time ? new Date(b.time * 1000).toISOString().replace(".000Z", "Z") : "–");
        setText(cells[3], JSON.stringify(b.data));
      }, "none yet");
  }

  $("chain-mine").addEventListener("click", async () => {
    setText($("chain-result"), "mining ...");
    try {
      const reply = await link.call("mine", { data: "from the page" });
      setText($("chain-result"), reply.status === 200
        ? "mined block " + reply.response.block.height + " " + short(reply.response.block.hash, 16)
        : reply.status + " " + reply.error);
      await refreshChain();
    } catch (e) {
      setText($("chain-result"), "no reply: " + e);
    }
  });

  async function refreshLoop() {
    await refresh();
    setTimeout(refreshLoop, REFRESH_MS);
  }

  // -- messages --------------------------------------------------------------

  // What the page wants to be subscribed to: one subscription each, made
  // again on every reopened connection. A subscription may hold a key id
  // (it then receives only what that key opens, decrypted) and a signer's
  // public key (only messages signed by it).
  function subKey(s) { return s.topic + "\n" + (s.key || "") + "\n" + (s.from || ""); }

  function wantSub(s) {
    const k = subKey(s);
    if (!wanted.has(k)) wanted.set(k, { topic: s.topic, key: s.key || "", from: s.from || "", sid: null, state: "pending" });
    return wanted.get(k);
  }

  function wantsTopic(topic) {
    for (const s of wanted.values()) if (s.topic === topic) return true;
    return false;
  }

  function renderTopics() {
    const list = Array.from(wanted.entries()).sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
    syncList($("topics"), list, ([k]) => k,
      () => el("li", { class: "chip" }, el("span", { class: "name" }), el("span", { class: "filter small muted" }),
        el("button", { type: "button", class: "remove", "aria-label": "unsubscribe" }, "×")),
      (li, [k, s]) => {
        const [name, filter, remove] = li.children;
        setAttr(li, "data-topic", s.topic);
        setAttr(li, "data-keyid", s.key);
        setAttr(li, "data-from", s.from);
        setAttr(li, "data-state", s.state);
        setAttr(li, "data-subscription", s.sid || "");
        setText(name, s.topic);
        const bits = [];
        if (s.key) bits.push("key " + short(s.key, 8));
        if (s.from) bits.push("from " + short(s.from, 8));
        setText(filter, bits.join(" · "));
        setAttr(filter, "title", (s.key ? "key id " + s.key : "clear messages only") + (s.from ? "\nsigned by " + s.from : ""));
        setAttr(remove, "title", "unsubscribe from " + s.topic);
      });
  }

  async function subscribe(s) {
    s.state = "pending";
    s.sid = null;
    renderTopics();
    const args = { topics: [s.topic] };
    if (s.key) args.key = s.key;
    if (s.from) args.from = [s.from];
    try {
      const r = await link.call("subscribe", args);
      if (wanted.get(subKey(s)) !== s) {
        // removed while the request was out
        if (r.status === 200) link.call("unsubscribe", { subscription: r.response.subscription }).catch(() => {});
        return;
      }
      s.state = r.status === 200 ? "subscribed" : "refused";
      s.sid = r.status === 200 && r.response ? r.response.subscription : null;
      renderTopics();
      if (r.status !== 200) setText($("publish-result"), "subscribe refused: " + r.status + " " + r.error);
    } catch (e) { /* resubscribed on reconnect */ }
  }

  // A public key is its X25519 half, then its Ed25519 half. Only the
  // Ed25519 half is proven by a signature: anyone may put someone else's
  // X25519 half in front of their own signing key, so the digits shown for
  // a signer are those of the signing half (the whole key is the title).
  function signerText(from) {
    return typeof from === "string" && from ? "signed by " + short(from.slice(64) || from, 12) : "unsigned";
  }

  function addToFeed(ev) {
    if (typeof ev.id === "string") {
      if (seenMessages.has(ev.id)) return;
      seenMessages.add(ev.id);
      if (seenMessages.size > 5 * FEED_MAX) seenMessages.delete(seenMessages.values().next().value);
    }
    const feed = $("feed");
    for (const e of feed.querySelectorAll(".empty")) e.remove();
    const text = typeof ev.payload === "string" ? ev.payload : asJson(ev.payload, false);
    const fromSelf = ev.origin === selfId;
    const sealing = ev.encrypted === "sym" || ev.encrypted === "asym" ? ev.encrypted : "none";
    const signer = typeof ev.from === "string" && ev.from ? ev.from : null;
    const pow = typeof ev.pow === "number" && isFinite(ev.pow) ? ev.pow : null;
    const li = el("li", {
      class: "message" + (fromSelf ? " own" : ""),
      "data-id": ev.id, "data-topic": ev.topic, "data-origin": ev.origin,
      "data-encrypted": sealing, "data-from": signer || "", "data-pow": pow === null ? "" : pow,
    },
    el("div", { class: "head small" },
      el("time", {}, clock(ev.created)),
      el("span", { class: "topic" }, "#" + String(ev.topic)),
      el("span", { class: "origin muted", title: ev.origin }, fromSelf ? "from this node" : "from " + short(ev.origin, 12))),
    el("div", { class: "seal small" },
      el("span", { class: "encrypted enc-" + sealing, title: sealing === "sym" ? "opened with a symmetric key"
        : sealing === "asym" ? "sent to one of this node's public keys, opened with its private key"
          : "not encrypted: every node can read it" }, sealing === "none" ? "clear" : sealing),
      el("span", { class: signer ? "signer" : "signer unsigned", title: signer || "no sender signature" }, signerText(signer)),
      el("span", { class: "pow muted", title: "proof of work reached" }, "pow " + (pow === null ? "?" : formatPow(pow)))),
    el("div", { class: typeof ev.payload === "string" ? "payload text" : "payload json" }, text));
    feed.prepend(li);
    feedCount++;
    while (feed.children.length > FEED_MAX) feed.lastElementChild.remove();
  }

  function formatPow(pow) {
    if (pow === 0) return "0";
    return pow >= 0.01 && pow < 1e6 ? String(Number(pow.toPrecision(3))) : pow.toExponential(2);
  }

  $("subscribe-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const topic = $("topic").value.trim();
    if (!topic) return;
    const s = wantSub({ topic: topic, key: $("subscribe-key").value.trim(), from: $("subscribe-from").value.trim() });
    subscribe(s);
    $("publish-topic").value = topic;
  });

  $("topics").addEventListener("click", async (e) => {
    const button = e.target.closest("button.remove");
    if (!button) return;
    const k = button.parentElement.dataset.key;
    const s = wanted.get(k);
    if (!s) return;
    wanted.delete(k);
    renderTopics();
    if (!s.sid) return;
    try { await link.call("unsubscribe", { subscription: s.sid }); } catch (err) { /* gone with the connection */ }
  });

  // publish's args from the form: the payload as JSON when it parses, and
  // the private-message fields that are filled in.
  function publishArgs() {
    const topic = $("publish-topic").value.trim();
    const raw = $("payload").value;
    let payload;
    try { payload = JSON.parse(raw); } catch (err) { payload = raw; }
    const args = { topic: topic, payload: payload };
    const key = $("publish-key").value.trim();
    const to = $("publish-to").value.trim();
    const sign = $("publish-sign").value.trim();
    const pow = $("publish-pow").value.trim();
    if (key) args.key = key;
    if (to) args.to = to;
    if (sign) args.sign = sign;
    if (pow) args.pow = Number.isFinite(Number(pow)) ? Number(pow) : pow;
    return args;
  }

  $("publish-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const args = publishArgs();
    const out = $("publish-result");
    try {
      const r = await link.call("publish", args);
      setAttr(out, "data-status", r.status);
      const how = [args.key ? "sym" : args.to ? "asym" : "clear"];
      if (args.sign) how.push("signed");
      setText(out, r.status === 202 && r.response
        ? "published to #" + args.topic + " as " + short(r.response.id, 16) + " (" + how.join(", ") +
          (typeof r.response.pow === "number" ? ", pow " + formatPow(r.response.pow) : "") + ")" +
          (wantsTopic(args.topic) ? "" : " (subscribe to see it in the feed)")
        : "not published: " + r.status + " " + r.error);
    } catch (err) {
      setText(out, "not published: " + err.message);
    }
  });

  // The same publish, typed out in the console: to see or edit it there.
  $("publish-to-console").addEventListener("click", () => {
    $("request").value = asJson({ op: "publish", args: publishArgs() }, false);
    $("request").focus();
  });

  // -- the console -----------------------------------------------------------

  // A WebSocket of its own: what is typed goes out unchanged (with or
  // without an id, even if it is not JSON), and the reply is the next frame
  // that carries a status. Pushed events are listed in the frame log only.
  let consoleWs = null;
  let sentAt = null;

  function logFrame(direction, text) {
    const log = $("console-log");
    log.prepend(el("li", { class: direction }, el("span", { class: "dir" }, direction === "out" ? "→" : "←"),
      el("code", {}, text.length > 2000 ? text.slice(0, 2000) + "…" : text)));
    while (log.children.length > LOG_MAX) log.lastElementChild.remove();
  }

  function showReply(text, status) {
    const reply = $("reply");
    setText(reply, text);
    setAttr(reply, "data-status", status);
    setAttr(reply, "class", "status-" + String(status).charAt(0) + "xx");
  }

  function consoleSocket() {
    return new Promise((resolve, reject) => {
      if (consoleWs && consoleWs.readyState === WebSocket.OPEN) { resolve(consoleWs); return; }
      if (consoleWs && consoleWs.readyState === WebSocket.CONNECTING) {
        consoleWs.addEventListener("open", () => resolve(consoleWs), { once: true });
        consoleWs.addEventListener("close", () => reject(new Error("cannot connect")), { once: true });
        return;
      }
      const ws = new WebSocket(WS_URL);
      consoleWs = ws;
      ws.onopen = () => resolve(ws);
      ws.onmessage = (m) => {
        const text = typeof m.data === "string" ? m.data : "(binary frame)";
        logFrame("in", text);
        let msg = null;
        try { msg = JSON.parse(text); } catch (e) { /* shown raw in the log */ }
        if (msg && typeof msg === "object" && typeof msg.status === "number") {
          const ms = sentAt === null ? null : Math.round(performance.now() - sentAt);
          sentAt = null;
          showReply(asJson(msg, true), msg.status);
          setText($("reply-meta"), msg.status + " " + (msg.error || "") + (ms === null ? "" : " · " + ms + " ms"));
        }
      };
      ws.onclose = (e) => {
        if (consoleWs === ws) consoleWs = null;
        logFrame("in", "(connection closed: " + e.code + (e.reason ? " " + e.reason : "") + ")");
        reject(new Error("cannot connect"));
        if (sentAt !== null) {
          sentAt = null;
          showReply("connection closed before a reply (" + e.code + (e.reason ? ": " + e.reason : "") + ")", 0);
          setText($("reply-meta"), "");
        }
      };
    });
  }

  async function sendConsole() {
    const text = $("request").value;
    setText($("reply-meta"), "sending…");
    try {
      const ws = await consoleSocket();
      sentAt = performance.now();
      ws.send(text);
      logFrame("out", text);
      setText($("reply-meta"), "sent, waiting for the reply…");
    } catch (e) {
      showReply("not sent: " + e.message, 0);
      setText($("reply-meta"), "");
    }
  }

  $("op-form").addEventListener("submit", (e) => { e.preventDefault(); sendConsole(); });
  $("request").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); sendConsole(); }
  });
  $("presets").addEventListener("click", (e) => {
    const button = e.target.closest("button[data-request]");
    if (!button) return;
    $("request").value = button.dataset.request;
    $("request").focus();
  });

  // -- start -----------------------------------------------------------------

  setText($("ws-url"), WS_URL);
  wantSub({ topic: "chat" });
  renderTopics();
  const link = new NodeLink(WS_URL, {
    onState: showConnectionState,
    onOpen: () => { for (const s of wanted.values()) subscribe(s); refresh(); },
    onEvent: (ev) => { if (ev.event === "message") addToFeed(ev); },
  });
  setTimeout(refreshLoop, REFRESH_MS);
  setInterval(renderUptime, 1000);
})();
