// The node's page: one WebSocket to this node, the same ops any client uses.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const wsUrl = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws";
  let ws = null, nextId = 1;
  const pending = new Map();
  const subscribed = new Set();

  function call(op, args) {
    return new Promise((resolve, reject) => {
      if (!ws || ws.readyState !== WebSocket.OPEN) return reject(new Error("not connected"));
      const id = "page-" + nextId++;
      pending.set(id, resolve);
      const msg = { op: op, id: id };
      if (args !== undefined) msg.args = args;
      ws.send(JSON.stringify(msg));
    });
  }

  function text(el, value) { el.textContent = value; }
  function short(id) { return id ? id.slice(0, 12) + "…" : "?"; }

  function renderInfo(info) {
    text($("node-id"), info.node_id);
    text($("network"), info.network);
    text($("version"), info.version);
    text($("uptime"), Math.round(info.uptime) + " s");
    const tbody = $("connected");
    tbody.replaceChildren();
    for (const c of info.connected) {
      const tr = document.createElement("tr");
      for (const v of [short(c.node_id), c.addr || "", c.direction]) {
        const td = document.createElement("td"); td.textContent = v; tr.appendChild(td);
      }
      tr.title = c.node_id;
      tbody.appendChild(tr);
    }
    text($("connected-count"), info.connected.length);
  }

  function renderPeers(list) {
    const ul = $("peers");
    ul.replaceChildren();
    if (!list.length) {
      const li = document.createElement("li"); li.className = "empty"; li.textContent = "none yet"; ul.appendChild(li);
    }
    for (const p of list) {
      const li = document.createElement("li");
      if (typeof p === "string") {
        const code = document.createElement("code"); code.textContent = p; li.appendChild(code);
      } else {
        const code = document.createElement("code"); code.textContent = p.addr; li.appendChild(code);
        const st = document.createElement("span");
        st.className = "state-" + p.state;
        st.textContent = " " + p.state + (p.last_error ? " (" + p.last_error + ")" : "");
        li.appendChild(st);
      }
      ul.appendChild(li);
    }
    text($("peer-count"), list.length);
  }

  function renderGraph(selfId, topology) {
    // topology: {nodes: [id...], links: [[a, b]...]}; laid out on a circle.
    const svg = $("graph");
    const ns = "http://www.w3.org/2000/svg";
    svg.replaceChildren();
    const nodes = topology.nodes;
    const pos = new Map();
    const cx = 200, cy = 150, r = nodes.length > 1 ? 115 : 0;
    nodes.forEach((id, i) => {
      const a = (2 * Math.PI * i) / nodes.length - Math.PI / 2;
      pos.set(id, [cx + r * Math.cos(a), cy + r * Math.sin(a)]);
    });
    for (const [a, b] of topology.links) {
      if (!pos.has(a) || !pos.has(b)) continue;
      const l = document.createElementNS(ns, "line");
      l.setAttribute("x1", pos.get(a)[0]); l.setAttribute("y1", pos.get(a)[1]);
      l.setAttribute("x2", pos.get(b)[0]); l.setAttribute("y2", pos.get(b)[1]);
      svg.appendChild(l);
    }
    for (const id of nodes) {
      const [x, y] = pos.get(id);
      const c = document.createElementNS(ns, "circle");
      c.setAttribute("cx", x); c.setAttribute("cy", y); c.setAttribute("r", 9);
      c.setAttribute("data-node-id", id);
      if (id === selfId) c.setAttribute("class", "self");
      svg.appendChild(c);
      const t = document.createElementNS(ns, "text");
      t.setAttribute("x", x + 11); t.setAttribute("y", y + 3); t.textContent = id.slice(0, 8);
      svg.appendChild(t);
    }
    svg.setAttribute("data-nodes", nodes.length);
  }

  async function refresh() {
    try {
      const info = await call("info");
      if (info.status === 200) {
        renderInfo(info.response);
        renderGraph(info.response.node_id, info.response.topology || {
          nodes: [info.response.node_id].concat(info.response.connected.map((c) => c.node_id)),
          links: info.response.connected.map((c) => [info.response.node_id, c.node_id]),
        });
        if (info.response.peers) renderPeers(info.response.peers);
      }
      if (!info.response || !info.response.peers) {
        const peers = await call("peers");
        if (peers.status === 200) renderPeers(peers.response.peers);
      }
    } catch (e) { /* reconnecting */ }
  }

  function addToFeed(ev) {
    const li = document.createElement("li");
    li.className = "message";
    li.textContent = "[" + ev.topic + "] " + JSON.stringify(ev.payload) + " from " + short(ev.origin);
    $("feed").prepend(li);
    while ($("feed").children.length > 100) $("feed").lastChild.remove();
  }

  function connect() {
    ws = new WebSocket(wsUrl);
    ws.onopen = () => {
      text($("ws-state"), "live");
      if (subscribed.size) call("subscribe", { topics: Array.from(subscribed) });
      refresh();
    };
    ws.onmessage = (m) => {
      let msg;
      try { msg = JSON.parse(m.data); } catch (e) { return; }
      if (msg.event === "message") { addToFeed(msg); return; }
      if (msg.id !== undefined && pending.has(msg.id)) {
        pending.get(msg.id)(msg); pending.delete(msg.id);
      } else if (msg.status !== undefined) {
        text($("reply"), JSON.stringify(msg, null, 2));
      }
    };
    ws.onclose = () => {
      text($("ws-state"), "disconnected, retrying…");
      for (const resolve of pending.values()) resolve({ status: 0, error: "disconnected", response: null });
      pending.clear();
      setTimeout(connect, 2000);
    };
  }

  $("op-form").addEventListener("submit", (e) => {
    e.preventDefault();
    let msg;
    try { msg = JSON.parse($("request").value); } catch (err) {
      // Send it anyway: the node answers what the lab's node answered.
      ws.send($("request").value);
      return;
    }
    const id = msg.id !== undefined ? msg.id : "page-" + nextId++;
    msg.id = id;
    pending.set(id, (reply) => { text($("reply"), JSON.stringify(reply, null, 2)); });
    ws.send(JSON.stringify(msg));
  });
  $("subscribe-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const topic = $("topic").value.trim();
    if (!topic) return;
    subscribed.add(topic);
    const r = await call("subscribe", { topics: [topic] });
    text($("reply"), JSON.stringify(r, null, 2));
  });
  $("publish-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    let payload;
    try { payload = JSON.parse($("payload").value); } catch (err) { payload = $("payload").value; }
    const r = await call("publish", { topic: $("topic").value.trim(), payload: payload });
    text($("reply"), JSON.stringify(r, null, 2));
  });

  connect();
  setInterval(refresh, 2000);
})();
