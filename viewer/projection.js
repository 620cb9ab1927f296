// The UMAP projection of the archive on a canvas, coloured by class; hover names a point, click
// reviews it. Points are written straight into one ImageData per frame and found under the
// pointer through a coarse grid, so 100k cells stay responsive.

import { getJSON } from "./api.js";
import { PanZoomCanvas } from "./panzoom.js";
import { classColour, colourRGB, el, fill, plural, swatch } from "./ui.js";

const PICK_RADIUS_PX = 8;
const GRID_BINS = 128;

export class ProjectionPage {
  constructor(section, app) {
    this.app = app;
    this.loaded = null;
    this.hidden = new Set(); // classes switched off
    this.hover = -1;
    this.canvas = el("canvas", {
      id: "projection-canvas", tabindex: "0", role: "application",
      "aria-label": "UMAP projection of the archive. Plus and minus zoom, arrow keys pan, 0 fits; click a point to review it.",
      onkeydown: (e) => this.key(e),
    });
    this.tooltip = el("div", { class: "tooltip", role: "status", hidden: true });
    this.legend = el("div", { class: "legend", "aria-label": "Classes (click to hide or show)" });
    this.info = el("span", { class: "muted small" });
    this.flaggedToggle = el("input", { type: "checkbox", onchange: () => this.panzoom.requestDraw() });
    section.append(
      el("div", { class: "toolbar" },
        el("h2", {}, "Projection (UMAP)"),
        el("label", {}, this.flaggedToggle, " ring uncertain cells"),
        el("span", { class: "button-group" },
          el("button", { type: "button", "aria-label": "Zoom in", onclick: () => this.panzoom.zoomBy(1.5) }, "+"),
          el("button", { type: "button", "aria-label": "Zoom out", onclick: () => this.panzoom.zoomBy(1 / 1.5) }, "−"),
          el("button", { type: "button", onclick: () => this.panzoom.fit() }, "Fit")),
        this.info),
      el("div", { class: "canvas-wrap" }, this.canvas, this.tooltip),
      this.legend);
    this.panzoom = new PanZoomCanvas(this.canvas, {
      draw: (context, view) => this.draw(context, view),
      onHover: (world, event) => this.pointerHover(world, event),
      onClick: (world) => {
        const index = this.pick(world);
        if (index >= 0) this.app.navigate(`#/review/${encodeURIComponent(this.data.cell_ids[index])}`);
      },
    });
  }

  async show() {
    if (!this.loaded) this.loaded = this.load();
    await this.loaded;
    this.panzoom.resize();
  }

  async load() {
    const data = await getJSON("/v1/atlas/projection");
    const classes = this.app.atlas.classes;
    const n = data.cell_ids.length;
    let [minX, maxX, minY, maxY] = [Infinity, -Infinity, Infinity, -Infinity];
    for (let i = 0; i < n; i++) {
      minX = Math.min(minX, data.x[i]);
      maxX = Math.max(maxX, data.x[i]);
      minY = Math.min(minY, data.y[i]);
      maxY = Math.max(maxY, data.y[i]);
    }
    const spanX = maxX - minX || 1;
    const spanY = maxY - minY || 1;
    // World units: x right, y down (UMAP's y up), the longer side 1000 units.
    const unit = 1000 / Math.max(spanX, spanY);
    this.px = new Float32Array(n);
    this.py = new Float32Array(n);
    this.classIndex = new Int16Array(n);
    for (let i = 0; i < n; i++) {
      this.px[i] = (data.x[i] - minX) * unit;
      this.py[i] = (maxY - data.y[i]) * unit;
      this.classIndex[i] = classes.indexOf(data.labels[i]);
    }
    this.data = data;
    this.width = spanX * unit;
    this.height = spanY * unit;
    this.rgb = classes.map((label) => colourRGB(classColour(classes, label)));
    this.buildGrid();
    this.info.textContent = plural(n, "cell");
    this.renderLegend();
    const content = this.panzoom.content;
    if (content.width !== this.width || content.height !== this.height) this.panzoom.setContent(this.width, this.height);
    this.panzoom.requestDraw();
  }

  /** Points per grid bin, for picking the point under the pointer without scanning them all. */
  buildGrid() {
    const n = this.px.length;
    const bins = new Map();
    this.binSize = Math.max(this.width, this.height) / GRID_BINS || 1;
    for (let i = 0; i < n; i++) {
      const key = `${Math.floor(this.px[i] / this.binSize)},${Math.floor(this.py[i] / this.binSize)}`;
      if (!bins.has(key)) bins.set(key, []);
      bins.get(key).push(i);
    }
    this.bins = bins;
  }

  draw(context, view) {
    if (!this.px) return;
    const { width, height } = context.canvas;
    const image = context.createImageData(width, height);
    const pixels = image.data;
    const r = view.ratio;
    const classes = this.app.atlas.classes;
    const ring = this.flaggedToggle.checked;
    const n = this.px.length;
    const { offsets, rim } = dotShape(this.dotDiameter(view));
    for (let i = 0; i < n; i++) {
      const c = this.classIndex[i];
      if (c >= 0 && this.hidden.has(classes[c])) continue;
      const cx = Math.round((view.x + this.px[i] * view.scale) * r);
      const cy = Math.round((view.y + this.py[i] * view.scale) * r);
      if (cx < -16 || cy < -16 || cx >= width + 16 || cy >= height + 16) continue;
      const colour = c >= 0 ? this.rgb[c] : [128, 128, 128];
      for (let k = 0; k < offsets.length; k += 2) {
        const x = cx + offsets[k];
        const y = cy + offsets[k + 1];
        if (x < 0 || y < 0 || x >= width || y >= height) continue;
        const offset = (y * width + x) * 4;
        const shade = rim[k / 2] ? 0.62 : 1; // a darker rim keeps light colours visible on white
        pixels[offset] = colour[0] * shade;
        pixels[offset + 1] = colour[1] * shade;
        pixels[offset + 2] = colour[2] * shade;
        pixels[offset + 3] = 255;
      }
    }
    context.putImageData(image, 0, 0);
    context.setTransform(r, 0, 0, r, 0, 0);
    if (ring) {
      context.strokeStyle = "rgba(209, 36, 47, 0.9)";
      context.lineWidth = 1.2;
      context.beginPath();
      for (let i = 0; i < n; i++) {
        if (!this.data.flagged[i]) continue;
        const c = this.classIndex[i];
        if (c >= 0 && this.hidden.has(classes[c])) continue;
        const [x, y] = this.panzoom.toScreen(this.px[i], this.py[i]);
        if (x < -10 || y < -10 || x > view.width + 10 || y > view.height + 10) continue;
        context.moveTo(x + 5, y);
        context.arc(x, y, 5, 0, 2 * Math.PI);
      }
      context.stroke();
    }
    if (this.hover >= 0) {
      const [x, y] = this.panzoom.toScreen(this.px[this.hover], this.py[this.hover]);
      context.strokeStyle = "#111";
      context.lineWidth = 2;
      context.beginPath();
      context.arc(x, y, 6, 0, 2 * Math.PI);
      context.stroke();
    }
  }

  /** Dots in device pixels: larger when there are few cells and when zoomed in. */
  dotDiameter(view) {
    const n = this.px.length;
    const base = n < 2000 ? 8 : n < 20000 ? 5 : 3;
    const zoom = Math.sqrt(view.scale / (this.panzoom.fitScale || view.scale));
    return Math.round(Math.max(2, Math.min(16, base * zoom)) * view.ratio);
  }

  /** The visible point nearest the world point, within PICK_RADIUS_PX on screen; -1 if none. */
  pick(world) {
    if (!world || !this.bins) return -1;
    const radius = PICK_RADIUS_PX / this.panzoom.view.scale;
    const classes = this.app.atlas.classes;
    const reach = Math.ceil(radius / this.binSize);
    const bx = Math.floor(world[0] / this.binSize);
    const by = Math.floor(world[1] / this.binSize);
    let best = -1;
    let bestDistance = radius * radius;
    for (let gx = bx - reach; gx <= bx + reach; gx++) {
      for (let gy = by - reach; gy <= by + reach; gy++) {
        for (const i of this.bins.get(`${gx},${gy}`) || []) {
          const c = this.classIndex[i];
          if (c >= 0 && this.hidden.has(classes[c])) continue;
          const d = (this.px[i] - world[0]) ** 2 + (this.py[i] - world[1]) ** 2;
          if (d <= bestDistance) {
            bestDistance = d;
            best = i;
          }
        }
      }
    }
    return best;
  }

  pointerHover(world) {
    const index = this.pick(world);
    if (index !== this.hover) {
      this.hover = index;
      this.panzoom.requestDraw();
    }
    this.canvas.style.cursor = index >= 0 ? "pointer" : "";
    if (index < 0) {
      this.tooltip.hidden = true;
      return;
    }
    const classes = this.app.atlas.classes;
    const label = this.data.labels[index];
    fill(this.tooltip,
      el("div", {}, swatch(classColour(classes, label)), el("b", {}, label ?? "unlabelled")),
      el("div", { class: "small" }, this.data.cell_ids[index]),
      this.data.flagged[index] ? el("div", { class: "small" }, "⚠ uncertain prediction") : null,
      el("div", { class: "small muted" }, "click to review"));
    const [x, y] = this.panzoom.toScreen(this.px[index], this.py[index]);
    this.tooltip.hidden = false;
    const box = this.tooltip.getBoundingClientRect();
    const { width, height } = this.panzoom.view;
    this.tooltip.style.left = `${Math.min(Math.max(4, x + 12), width - box.width - 4)}px`;
    this.tooltip.style.top = `${Math.min(Math.max(4, y + 12), height - box.height - 4)}px`;
  }

  renderLegend() {
    const classes = this.app.atlas.classes;
    const counts = new Map();
    for (const label of this.data.labels) counts.set(label, (counts.get(label) || 0) + 1);
    this.legend.replaceChildren(...classes.map((label) => el("button", {
      type: "button", class: "legend-item", "aria-pressed": String(!this.hidden.has(label)),
      onclick: () => {
        if (this.hidden.has(label)) this.hidden.delete(label);
        else this.hidden.add(label);
        this.renderLegend();
        this.panzoom.requestDraw();
      },
    }, swatch(classColour(classes, label)), `${label} (${counts.get(label) || 0})`)));
  }

  key(event) {
    const step = 60;
    const pans = { ArrowUp: [0, step], ArrowDown: [0, -step], ArrowLeft: [step, 0], ArrowRight: [-step, 0] };
    if (pans[event.key]) {
      event.preventDefault();
      this.panzoom.panBy(...pans[event.key]);
    } else {
      this.panzoom.zoomKey(event.key);
    }
  }

  invalidate() {
    this.loaded = null;
  }
}

/** Pixel offsets [dx0, dy0, dx1, dy1, ...] of a disc of `diameter` and which of them are its rim. */
const shapes = new Map();
function dotShape(diameter) {
  if (!shapes.has(diameter)) {
    const offsets = [];
    const rim = [];
    const radius = diameter / 2;
    for (let dy = -Math.ceil(radius); dy <= Math.ceil(radius); dy++) {
      for (let dx = -Math.ceil(radius); dx <= Math.ceil(radius); dx++) {
        const distance = Math.hypot(dx + 0.5, dy + 0.5) - 0.5;
        if (distance > radius) continue;
        offsets.push(dx, dy);
        rim.push(diameter >= 5 && distance > radius - 1.2);
      }
    }
    shapes.set(diameter, { offsets: Int16Array.from(offsets), rim });
  }
  return shapes.get(diameter);
}
