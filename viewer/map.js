// The atlas map: the SOM grid on a canvas, coloured by the U-matrix (light = borders between
// clusters), with the dominant class of each node (or one class's hits) drawn over it; hover for
// counts, click a node for a gallery of its cells. The grid is painted once into an offscreen
// canvas (one ImageData) and each frame only scales it, so a 244x244 map pans and zooms smoothly.

import { cellImage, getJSON, withQuery } from "./api.js";
import { PanZoomCanvas } from "./panzoom.js";
import { classColour, colourRGB, el, number, plural, swatch } from "./ui.js";

const BORDER_RGB = [246, 243, 235]; // high U-matrix values: borders, light
const CLUSTER_RGB = [46, 56, 70]; // low values: inside a cluster, dark
const GALLERY_LIMIT = 200;

export class MapPage {
  constructor(section, app) {
    this.app = app;
    this.loaded = null;
    this.overlay = "dominant"; // or "none"
    this.classFilter = ""; // "" = every class
    this.hover = null; // [row, col]
    this.selected = null;
    this.cursor = null; // keyboard position
    this.build(section);
  }

  build(section) {
    this.overlaySelect = el("select", { id: "map-overlay", onchange: (e) => this.setOverlay(e.target.value) },
      el("option", { value: "dominant" }, "Dominant class"),
      el("option", { value: "none" }, "U-matrix only"));
    this.classSelect = el("select", { id: "map-class", onchange: (e) => this.setClassFilter(e.target.value) });
    this.canvas = el("canvas", {
      id: "map-canvas", tabindex: "0", role: "application",
      "aria-label": "SOM atlas map. Arrow keys move between nodes, Enter opens a node, plus and minus zoom, 0 fits.",
      onkeydown: (e) => this.key(e),
      onblur: () => this.showTooltip(null),
    });
    this.tooltip = el("div", { class: "tooltip", role: "status", hidden: true });
    this.legend = el("div", { class: "legend", "aria-label": "Classes (click to show one class only)" });
    this.galleryTitle = el("h2", { id: "gallery-title" }, "Node cells");
    this.galleryInfo = el("p", { class: "muted" }, "Click a node of the map to see its cells.");
    this.gallery = el("ul", { class: "gallery", id: "gallery" });
    section.append(
      el("div", { class: "map-pane" },
        el("div", { class: "toolbar" },
          el("h2", {}, "Atlas map"),
          el("label", {}, "Overlay ", this.overlaySelect),
          el("label", {}, "Show ", this.classSelect),
          el("span", { class: "button-group" },
            el("button", { type: "button", "aria-label": "Zoom in", onclick: () => this.panzoom.zoomBy(1.5) }, "+"),
            el("button", { type: "button", "aria-label": "Zoom out", onclick: () => this.panzoom.zoomBy(1 / 1.5) }, "−"),
            el("button", { type: "button", onclick: () => this.panzoom.fit() }, "Fit")),
          el("span", { class: "muted small", id: "map-shape" })),
        el("div", { class: "canvas-wrap" }, this.canvas, this.tooltip),
        this.legend),
      el("aside", { class: "gallery-pane", "aria-labelledby": "gallery-title" },
        this.galleryTitle, this.galleryInfo, this.gallery));
    this.panzoom = new PanZoomCanvas(this.canvas, {
      draw: (context, view) => this.draw(context, view),
      onHover: (world) => this.pointerHover(world),
      onClick: (world) => {
        const node = this.nodeAt(world);
        if (node) this.app.navigate(`#/map/${node[0]}/${node[1]}`);
      },
    });
  }

  /** Called by the router: `node` = [row, col] or null. */
  async show({ node }) {
    if (!this.loaded) this.loaded = this.load();
    await this.loaded;
    this.panzoom.resize();
    if (node && this.inside(node) && String(node) !== String(this.selected)) this.openNode(node);
  }

  async load() {
    const classes = this.app.atlas.classes;
    const [uMatrix, all, ...perClass] = await Promise.all([
      getJSON("/v1/atlas/u-matrix"),
      getJSON("/v1/atlas/hits"),
      ...classes.map((label) => getJSON(withQuery("/v1/atlas/hits", { label }))),
    ]);
    const rows = uMatrix.rows;
    const cols = uMatrix.cols;
    this.rows = rows;
    this.cols = cols;
    this.uMatrix = Float32Array.from(uMatrix.values.flat());
    this.total = Int32Array.from(all.counts.flat());
    this.classHits = perClass.map((hits) => Int32Array.from(hits.counts.flat()));
    this.dominant = new Int16Array(rows * cols).fill(-1);
    for (let i = 0; i < rows * cols; i++) {
      let best = 0;
      for (let c = 0; c < classes.length; c++) {
        if (this.classHits[c][i] > best) {
          best = this.classHits[c][i];
          this.dominant[i] = c;
        }
      }
    }
    this.classSelect.replaceChildren(
      el("option", { value: "" }, "All classes"),
      ...classes.map((label) => el("option", { value: label }, `${label} only`)));
    document.getElementById("map-shape").textContent =
      `${rows}×${cols} nodes · ${plural(all.total, "cell")}`;
    this.renderLegend();
    this.paint();
    const content = this.panzoom.content;
    if (content.width !== cols || content.height !== rows) this.panzoom.setContent(cols, rows);
  }

  // -- painting ---------------------------------------------------------------------------------
  /** Paint every node into the offscreen canvas: U-matrix grey, hits as a class-coloured square. */
  paint() {
    const { rows, cols } = this;
    const classes = this.app.atlas.classes;
    const size = Math.max(4, Math.min(32, Math.floor(1536 / Math.max(rows, cols))));
    const width = cols * size;
    const image = new ImageData(width, rows * size);
    const pixels = image.data;
    let low = Infinity;
    let high = -Infinity;
    for (const v of this.uMatrix) {
      if (Number.isFinite(v)) {
        low = Math.min(low, v);
        high = Math.max(high, v);
      }
    }
    const span = high > low ? high - low : 1;
    const filterIndex = this.classFilter ? classes.indexOf(this.classFilter) : -1;
    const counts = filterIndex >= 0 ? this.classHits[filterIndex] : this.total;
    let maxCount = 1;
    for (const count of counts) maxCount = Math.max(maxCount, count);
    const rgbOf = classes.map((label) => colourRGB(classColour(classes, label)));
    const showHits = this.overlay !== "none" || filterIndex >= 0;
    for (let row = 0; row < rows; row++) {
      for (let col = 0; col < cols; col++) {
        const node = row * cols + col;
        const t = Number.isFinite(this.uMatrix[node]) ? (this.uMatrix[node] - low) / span : 0;
        const base = [0, 1, 2].map((k) => CLUSTER_RGB[k] + t * (BORDER_RGB[k] - CLUSTER_RGB[k]));
        const count = counts[node];
        let inset = size; // no square
        let fill = null;
        if (showHits && count > 0) {
          fill = rgbOf[filterIndex >= 0 ? filterIndex : this.dominant[node]];
          const side = size * (0.35 + 0.5 * Math.sqrt(count / maxCount));
          inset = Math.floor((size - side) / 2);
        }
        for (let y = 0; y < size; y++) {
          let offset = ((row * size + y) * width + col * size) * 4;
          const inY = y >= inset && y < size - inset;
          for (let x = 0; x < size; x++, offset += 4) {
            const colour = fill && inY && x >= inset && x < size - inset ? fill : base;
            pixels[offset] = colour[0];
            pixels[offset + 1] = colour[1];
            pixels[offset + 2] = colour[2];
            pixels[offset + 3] = 255;
          }
        }
      }
    }
    this.offscreen = this.offscreen || document.createElement("canvas");
    this.offscreen.width = width;
    this.offscreen.height = rows * size;
    this.offscreen.getContext("2d").putImageData(image, 0, 0);
    this.panzoom.requestDraw();
  }

  draw(context, view) {
    if (!this.offscreen) return;
    const r = view.ratio;
    context.imageSmoothingEnabled = false;
    context.setTransform(r * view.scale, 0, 0, r * view.scale, r * view.x, r * view.y);
    context.drawImage(this.offscreen, 0, 0, this.cols, this.rows);
    context.setTransform(r, 0, 0, r, 0, 0);
    if (view.scale >= 14) this.drawGridLines(context, view);
    const outline = (node, colour, width, dash = []) => {
      if (!node) return;
      const [x, y] = this.panzoom.toScreen(node[1], node[0]);
      context.setLineDash(dash);
      context.lineWidth = width;
      context.strokeStyle = colour;
      const s = view.scale;
      context.strokeRect(x + width / 2, y + width / 2, Math.max(1, s - width), Math.max(1, s - width));
      context.setLineDash([]);
    };
    outline(this.hover, "rgba(20, 110, 190, 0.9)", 2);
    outline(this.selected, "#d1242f", 3);
    if (document.activeElement === this.canvas) outline(this.cursor, "#111", 2, [4, 3]);
  }

  drawGridLines(context, view) {
    const [left, top] = this.panzoom.toWorld(0, 0);
    const [right, bottom] = this.panzoom.toWorld(view.width, view.height);
    const c0 = Math.max(0, Math.floor(left));
    const c1 = Math.min(this.cols, Math.ceil(right));
    const r0 = Math.max(0, Math.floor(top));
    const r1 = Math.min(this.rows, Math.ceil(bottom));
    context.beginPath();
    for (let c = c0; c <= c1; c++) {
      const [x] = this.panzoom.toScreen(c, 0);
      context.moveTo(x, this.panzoom.toScreen(0, r0)[1]);
      context.lineTo(x, this.panzoom.toScreen(0, r1)[1]);
    }
    for (let row = r0; row <= r1; row++) {
      const [, y] = this.panzoom.toScreen(0, row);
      context.moveTo(this.panzoom.toScreen(c0, 0)[0], y);
      context.lineTo(this.panzoom.toScreen(c1, 0)[0], y);
    }
    context.strokeStyle = "rgba(0, 0, 0, 0.18)";
    context.lineWidth = 1;
    context.stroke();
  }

  renderLegend() {
    const classes = this.app.atlas.classes;
    const counts = this.app.atlas.counts_by_label;
    const button = (label, text, colour) => el("button", {
      type: "button", class: "legend-item", "aria-pressed": String(this.classFilter === label),
      onclick: () => this.setClassFilter(this.classFilter === label ? "" : label),
    }, colour ? swatch(colour) : null, text);
    this.legend.replaceChildren(
      button("", "All classes"),
      ...classes.map((label) => button(label, `${label} (${counts[label] ?? 0})`, classColour(classes, label))),
      el("span", { class: "legend-scale muted small" },
        el("span", { class: "u-ramp", "aria-hidden": "true" }), "U-matrix: dark = cluster, light = border"));
  }

  setOverlay(value) {
    this.overlay = value;
    this.overlaySelect.value = value;
    this.paint();
  }

  setClassFilter(label) {
    this.classFilter = label;
    this.classSelect.value = label;
    this.renderLegend();
    this.paint();
  }

  // -- pointer and keyboard -------------------------------------------------------------------
  inside([row, col]) {
    return row >= 0 && col >= 0 && row < this.rows && col < this.cols;
  }

  nodeAt(world) {
    if (!world || !this.rows) return null;
    const node = [Math.floor(world[1]), Math.floor(world[0])];
    return this.inside(node) ? node : null;
  }

  pointerHover(world) {
    const node = this.nodeAt(world);
    if (String(node) !== String(this.hover)) {
      this.hover = node;
      this.panzoom.requestDraw();
    }
    this.showTooltip(node);
  }

  showTooltip(node) {
    if (!node) {
      this.tooltip.hidden = true;
      return;
    }
    const [row, col] = node;
    const index = row * this.cols + col;
    const classes = this.app.atlas.classes;
    const perClass = classes
      .map((label, c) => [label, this.classHits[c][index]])
      .filter(([, count]) => count > 0)
      .sort((a, b) => b[1] - a[1]);
    this.tooltip.replaceChildren(
      el("strong", {}, `Node (${row}, ${col})`),
      el("div", {}, `${plural(this.total[index], "cell")} · U-matrix ${number(this.uMatrix[index], 3)}`),
      ...perClass.map(([label, count]) =>
        el("div", { class: "tooltip-row" }, swatch(classColour(classes, label)), `${label}: ${count}`)));
    const [x, y] = this.panzoom.toScreen(col + 1, row);
    const { width, height } = this.panzoom.view;
    this.tooltip.hidden = false;
    const box = this.tooltip.getBoundingClientRect();
    this.tooltip.style.left = `${Math.min(Math.max(4, x + 8), width - box.width - 4)}px`;
    this.tooltip.style.top = `${Math.min(Math.max(4, y), height - box.height - 4)}px`;
  }

  key(event) {
    if (!this.rows) return;
    const moves = { ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1] };
    if (moves[event.key]) {
      event.preventDefault();
      const start = this.cursor || this.selected || [Math.floor(this.rows / 2), Math.floor(this.cols / 2)];
      const step = event.shiftKey ? 5 : 1;
      const next = [
        Math.min(this.rows - 1, Math.max(0, start[0] + moves[event.key][0] * step)),
        Math.min(this.cols - 1, Math.max(0, start[1] + moves[event.key][1] * step)),
      ];
      this.cursor = next;
      this.keepVisible(next);
      this.showTooltip(next);
      this.panzoom.requestDraw();
    } else if ((event.key === "Enter" || event.key === " ") && (this.cursor || this.hover)) {
      event.preventDefault();
      const node = this.cursor || this.hover;
      this.app.navigate(`#/map/${node[0]}/${node[1]}`);
    } else {
      this.panzoom.zoomKey(event.key);
    }
  }

  keepVisible([row, col]) {
    const [x, y] = this.panzoom.toScreen(col + 0.5, row + 0.5);
    const { width, height } = this.panzoom.view;
    if (x < 20 || y < 20 || x > width - 20 || y > height - 20) this.panzoom.centreOn(col + 0.5, row + 0.5);
  }

  // -- the gallery of one node ----------------------------------------------------------------
  async openNode([row, col]) {
    this.selected = [row, col];
    this.cursor = [row, col];
    this.panzoom.requestDraw();
    this.galleryTitle.textContent = `Node (${row}, ${col})`;
    this.galleryInfo.textContent = "Loading…";
    this.gallery.replaceChildren();
    const classes = this.app.atlas.classes;
    try {
      const node = await getJSON(withQuery(`/v1/atlas/nodes/${row}/${col}/cells`, { limit: GALLERY_LIMIT }));
      if (String(this.selected) !== String([row, col])) return; // another node was clicked meanwhile
      this.galleryInfo.textContent = node.total === 0
        ? "No cell has this node as its best match."
        : `${plural(node.total, "cell")}${node.total > node.cells.length ? `, the ${node.cells.length} closest shown` : ""}, closest to the node first.`;
      this.gallery.replaceChildren(...node.cells.map((cell) => el("li", {},
        el("a", { href: `#/review/${encodeURIComponent(cell.cell_id)}`, class: "thumb",
                  title: `Review cell ${cell.cell_id}` },
          cellImage(cell.image_url, `${cell.label ?? "unlabelled"} cell ${cell.cell_id}`),
          el("span", { class: "thumb-label" }, swatch(classColour(classes, cell.label)), el("b", {}, cell.label ?? "unlabelled")),
          el("span", { class: "thumb-sub" },
            cell.predicted_label && cell.predicted_label !== cell.label ? `predicted ${cell.predicted_label}` : "",
            cell.flagged ? el("span", { class: "flag-dot", title: "uncertain prediction" }, " ⚑") : "")))));
    } catch (error) {
      this.galleryInfo.textContent = `Could not load the node's cells: ${error.message}`;
    }
  }

  /** Labels changed (a correction): hit counts are stale. */
  invalidate() {
    this.loaded = null;
    this.selected = null;
  }
}
