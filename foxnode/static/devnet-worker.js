// The devnet page's worker: it reads the devnet's event stream, parses it
// and lays the network out, off the page's main thread, so that a
// thousand nodes' hundred kilobytes of links never hold up a frame. The
// page gets positions and flat links as transferred buffers (no copy).
"use strict";
importScripts("network.js");

let graph = null, centre = 0, width = 900, height = 900;

function layout() {
  if (!graph) return;
  const links = FoxNet.flatten(graph.links);
  const pos = FoxNet.rings(graph.nodes, FoxNet.adjacency(graph.nodes, links), centre, width, height).pos;
  postMessage({kind: "graph", version: graph.version, nodes: graph.nodes, up: graph.up, ids: graph.ids,
               centre, links, pos}, [links.buffer, pos.buffer]);
}

onmessage = (e) => {
  const m = e.data;
  if (m.width) { width = m.width; height = m.height; }
  if (m.centre !== undefined && m.centre !== centre) { centre = m.centre; layout(); }
};

const stream = new EventSource("events");
stream.addEventListener("graph", (e) => { graph = JSON.parse(e.data); layout(); });
stream.addEventListener("spread", (e) => postMessage({kind: "spread", messages: JSON.parse(e.data)}));
stream.onerror = () => postMessage({kind: "error"});
