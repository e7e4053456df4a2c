// The devnet's live page: the network and its messages from the devnet's
// event stream (/events), drawn by network.js. Nothing is redrawn unless
// something changed: a stream event or an animation under way marks the
// picture dirty, and one animation frame draws it.
"use strict";

(() => {
  const c = document.getElementById("c"), g = c.getContext("2d");
  const status = document.getElementById("status"), pick = document.getElementById("at");
  const msgSel = document.getElementById("msg"), replay = document.getElementById("replay");
  const layer = new FoxNet.LinkLayer(c.width, c.height);
  const C = FoxNet.COLOURS;
  // What the page knows: the graph (nodes, up, ids, links) and the messages.
  const S = {graph: null, messages: [], shown: null, centre: 0, pos: null,
             play: null, dirty: false, frame: 0};
  // Exposed for tests and the curious: what is drawn, and how often.
  window.devnetPage = S;

  function schedule() {
    if (!S.dirty) { S.dirty = true; requestAnimationFrame(draw); }
  }

  // The worker lays out around the node that published the message shown.
  function relayout() {
    const m = S.shown, centre = m && m.origin !== null ? m.origin : 0;
    if (centre !== S.centre) { S.centre = centre; worker.postMessage({centre}); }
  }

  // Seconds after publishing the picture shows: the real time, slowed so
  // that even a spread of a few milliseconds takes two seconds to watch.
  function shownTime(now) {
    const m = S.shown;
    if (!m || !S.play) return Infinity;
    const last = Math.max(0.001, ...Object.values(m.got));
    const elapsed = (now - S.play) / 1000, slow = Math.min(1, last / 2);
    if (elapsed * slow >= last + 0.5) { S.play = null; return Infinity; }
    return elapsed * slow;
  }

  function draw(now) {
    S.dirty = false;
    S.frame++;
    const G = S.graph;
    g.clearRect(0, 0, c.width, c.height);
    if (!G || !S.pos) return;
    g.drawImage(layer.canvas, 0, 0);
    const m = S.shown, t = shownTime(now);
    FoxNet.drawNodes(g, S.pos, G.nodes, (i) => {
      if (!G.up[i]) return C.down;
      if (!m) return C.up;
      if (i === m.origin) return C.origin;
      const got = m.got[i];
      return got !== undefined && got <= t ? C.reached : C.waiting;
    });
    if (m) {
      const reached = Object.keys(m.got).length;
      status.textContent = `${G.up.filter(Boolean).length}/${G.nodes} nodes up, ${G.linkCount} links; ` +
        `message ${m.id.slice(0, 8)}: ${reached}/${G.nodes} nodes` + (S.play ? ` (${t.toFixed(3)} s)` : "");
    } else {
      status.textContent = `${G.up.filter(Boolean).length}/${G.nodes} nodes up, ${G.linkCount} links`;
    }
    if (S.play) schedule();
  }

  // Whether node a and node b are linked (for tests and the hover line).
  S.linked = (a, b) => {
    const L = S.graph ? S.graph.links : [];
    for (let k = 0; k < L.length; k += 2) if ((L[k] === a && L[k + 1] === b) || (L[k] === b && L[k + 1] === a)) return true;
    return false;
  };

  // A graph from the worker: positions and flat links, laid out already.
  function onGraph(G) {
    if (S.firstGraph === undefined) S.firstGraph = performance.now();
    G.linkCount = G.links.length >> 1;
    S.graph = G; S.pos = G.pos;
    S.layered = false;
    layer.draw(G.pos, G.links, () => { S.layered = true; schedule(); });
    // A number to type, not an element per node.
    pick.max = G.nodes - 1;
    schedule();
  }

  function onSpread(list) {
    const before = S.messages.length ? S.messages[S.messages.length - 1].id : null;
    S.messages = list;
    const newest = list.length ? list[list.length - 1] : null;
    msgSel.length = 0;
    list.forEach((m, k) => {
      const o = document.createElement("option"); o.value = m.id;
      o.textContent = `${k + 1}: ${m.id.slice(0, 8)} from ` + (m.origin === null ? "?" : `node-${m.origin}`);
      msgSel.appendChild(o);
    });
    if (newest && newest.id !== before) {
      // A new message: show it, from the start.
      S.shown = newest; S.play = performance.now();
    } else if (S.shown) {
      S.shown = list.find((m) => m.id === S.shown.id) || newest;
    }
    if (S.shown) msgSel.value = S.shown.id;
    replay.disabled = !S.shown;
    relayout(); schedule();
  }

  msgSel.onchange = () => {
    S.shown = S.messages.find((m) => m.id === msgSel.value) || null; S.play = performance.now();
    relayout(); schedule();
  };
  replay.onclick = () => { S.play = performance.now(); schedule(); };

  document.getElementById("publish").onclick = async () => {
    const body = pick.value.trim() === "" ? {} : {node: +pick.value};
    try {
      const r = await fetch("publish", {method: "POST", headers: {"content-type": "application/json"},
                                         body: JSON.stringify(body)});
      const reply = await r.json();
      if (!r.ok) status.textContent = `publish refused: ${reply.error}`;
    } catch (e) {
      status.textContent = `publish failed: ${e}`;
    }
  };

  c.onmousemove = (e) => {
    if (!S.graph || !S.pos) return;
    const box = c.getBoundingClientRect();
    const i = FoxNet.nearest(S.pos, S.graph.nodes, (e.clientX - box.left) * c.width / box.width,
                             (e.clientY - box.top) * c.height / box.height, 6);
    if (i < 0) return;
    const L = S.graph.links, id = S.graph.ids[i];
    let links = 0;
    for (let k = 0; k < L.length; k++) if (L[k] === i) links++;
    document.getElementById("hover").textContent =
      `node-${i} ${S.graph.up[i] ? "up" : "down"}, ${links} links, id ${id ? id.slice(0, 16) : "?"}`;
  };

  // The worker reads the stream (EventSource reconnects by itself when the
  // devnet restarts) and lays out; the page only draws.
  const worker = new Worker("devnet-worker.js");
  worker.onmessage = (e) => {
    const m = e.data;
    if (m.kind === "graph") onGraph(m);
    else if (m.kind === "spread") onSpread(m.messages);
    else status.textContent = "the devnet does not answer; retrying\u2026";
  };
  worker.postMessage({width: c.width, height: c.height});
})();
