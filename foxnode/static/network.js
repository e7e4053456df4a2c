// The drawing of a whole foxnode network on one <canvas>: the devnet's live
// page (devnet.js) and the experiment's report page (network.html) both use
// it, so that there is one way of drawing a network.
//
// Built for a thousand nodes and tens of thousands of links: no element per
// node; the layout is a breadth-first search (linear in the links), which
// the devnet page runs in a Web Worker (devnet-worker.js loads this file
// too); the links are drawn once onto a layer of their own, a thousand or so
// per animation frame, and a frame then only copies that layer and fills the
// nodes, one path per colour. Links are flat arrays [a0, b0, a1, b1, ...]
// (an Int32Array crosses from a worker without a copy).
"use strict";

const FoxNet = (() => {
  // Links drawn per animation frame while a layer is being drawn: well under
  // a frame's time even in a software-rendered canvas.
  const LINKS_PER_FRAME = 1500;

  // Adjacency lists (arrays of node indexes) of `count` nodes from flat links.
  function adjacency(count, links) {
    const adj = Array.from({length: count}, () => []);
    for (let k = 0; k + 1 < links.length; k += 2) {
      const a = links[k], b = links[k + 1];
      if (a >= 0 && b >= 0 && a < count && b < count && a !== b) { adj[a].push(b); adj[b].push(a); }
    }
    return adj;
  }

  // Flat links from a list of [a, b] pairs.
  function flatten(pairs) {
    const flat = new Int32Array(2 * pairs.length);
    pairs.forEach(([a, b], k) => { flat[2 * k] = a; flat[2 * k + 1] = b; });
    return flat;
  }

  // Positions of `count` nodes in rings around the centre by their hop count
  // from `origin` (the centre); nodes it cannot reach on the outermost ring.
  // Returns a Float32Array [x0, y0, x1, y1, ...].
  function rings(count, adj, origin, width, height) {
    const dist = new Int32Array(count).fill(-1);
    let far = 0;
    if (origin >= 0 && origin < count) {
      dist[origin] = 0;
      let front = [origin];
      while (front.length) {
        const next = [];
        for (const a of front) for (const b of (adj[a] || [])) {
          if (dist[b] < 0) { dist[b] = dist[a] + 1; next.push(b); }
        }
        if (next.length) far = dist[next[0]];
        front = next;
      }
    }
    const byRing = new Map();
    for (let i = 0; i < count; i++) {
      const h = dist[i];
      if (!byRing.has(h)) byRing.set(h, []);
      byRing.get(h).push(i);
    }
    // The farthest ring reached fills the canvas; the unreached ring lies outside it.
    const R = Math.min(width, height) / 2 - 12, step = 0.9 * R / Math.max(1, far);
    const pos = new Float32Array(2 * count);
    for (const [h, ring] of byRing) {
      const r = h < 0 ? R : step * h, turn = h * 0.37;  // rings offset, so spokes do not line up
      ring.forEach((i, k) => {
        const a = 2 * Math.PI * k / ring.length + turn;
        pos[2 * i] = width / 2 + r * Math.cos(a);
        pos[2 * i + 1] = height / 2 + r * Math.sin(a);
      });
    }
    return {pos, dist, far};
  }

  // A canvas the links are drawn onto, LINKS_PER_FRAME at a time; `done()`
  // is called (on an animation frame) once they all are. Calling draw again
  // abandons the drawing under way.
  class LinkLayer {
    constructor(width, height) {
      this.canvas = document.createElement("canvas");
      this.canvas.width = width; this.canvas.height = height;
      this.generation = 0;
    }
    draw(pos, links, done) {
      const g = this.canvas.getContext("2d"), gen = ++this.generation;
      g.clearRect(0, 0, this.canvas.width, this.canvas.height);
      // Fainter as there are more links: a thousand nodes stay readable.
      const count = links.length >> 1;
      const alpha = Math.max(0.03, Math.min(0.35, 60 / Math.sqrt(count + 1) / 10));
      g.strokeStyle = `rgba(0,0,0,${alpha.toFixed(3)})`;
      g.lineWidth = 1;
      let at = 0;
      const chunk = () => {
        if (gen !== this.generation) return;
        const end = Math.min(count, at + LINKS_PER_FRAME);
        g.beginPath();
        for (; at < end; at++) {
          const a = links[2 * at], b = links[2 * at + 1];
          g.moveTo(pos[2 * a], pos[2 * a + 1]); g.lineTo(pos[2 * b], pos[2 * b + 1]);
        }
        g.stroke();
        if (at < count) requestAnimationFrame(chunk);
        else if (done) done();
      };
      requestAnimationFrame(chunk);
    }
  }

  // Fill node i as a square of colour `colourOf(i)` (a CSS colour; null: not
  // drawn), one path per colour.
  function drawNodes(g, pos, count, colourOf, size) {
    const half = (size || 4) / 2, paths = new Map();
    for (let i = 0; i < count; i++) {
      const colour = colourOf(i);
      if (colour === null) continue;
      let p = paths.get(colour);
      if (!p) { p = new Path2D(); paths.set(colour, p); }
      p.rect(pos[2 * i] - half, pos[2 * i + 1] - half, 2 * half, 2 * half);
    }
    for (const [colour, p] of paths) { g.fillStyle = colour; g.fill(p); }
  }

  // The node nearest to (x, y) within `radius` pixels, or -1.
  function nearest(pos, count, x, y, radius) {
    let best = -1, bestD = radius * radius;
    for (let i = 0; i < count; i++) {
      const dx = pos[2 * i] - x, dy = pos[2 * i + 1] - y, d = dx * dx + dy * dy;
      if (d <= bestD) { best = i; bestD = d; }
    }
    return best;
  }

  const COLOURS = {origin: "#06c", reached: "#f80", waiting: "#999", down: "#d22", up: "#2a2"};

  return {adjacency, flatten, rings, LinkLayer, drawNodes, nearest, COLOURS};
})();
