// A <canvas> with wheel zoom (around the pointer), drag pan, click and hover in world
// coordinates, sized to its box at the device's pixel ratio and redrawn once per animation frame.
// The SOM map and the UMAP scatter both use it.

const DRAG_THRESHOLD_PX = 4;

export class PanZoomCanvas {
  /**
   * draw(context, view): paint a frame; `view` = {scale, x, y, width, height, ratio} where a world
   * point (wx, wy) sits at CSS pixel (x + wx * scale, y + wy * scale).
   * onHover(world | null, event), onClick(world, event): pointer in world units.
   */
  constructor(canvas, { draw, onHover = () => {}, onClick = () => {}, padding = 12 }) {
    this.canvas = canvas;
    this.context = canvas.getContext("2d");
    this.drawFrame = draw;
    this.onHover = onHover;
    this.onClick = onClick;
    this.padding = padding;
    this.view = { scale: 1, x: 0, y: 0, width: 1, height: 1, ratio: 1 };
    this.content = { width: 1, height: 1 };
    this.pending = false;
    this.fitted = false;
    this.pointer = null;
    canvas.addEventListener("wheel", (e) => this.wheel(e), { passive: false });
    canvas.addEventListener("pointerdown", (e) => this.pointerDown(e));
    canvas.addEventListener("pointermove", (e) => this.pointerMove(e));
    canvas.addEventListener("pointerup", (e) => this.pointerUp(e));
    canvas.addEventListener("pointercancel", () => (this.pointer = null));
    canvas.addEventListener("pointerleave", (e) => {
      if (!this.pointer) this.onHover(null, e);
    });
    new ResizeObserver(() => this.resize()).observe(canvas.parentElement);
  }

  /** The world's extent; the first call (and `fit()`) frames it. */
  setContent(width, height) {
    this.content = { width, height };
    this.fitted = false;
    this.resize();
  }

  resize() {
    const parent = this.canvas.parentElement;
    const box = { width: parent.clientWidth, height: parent.clientHeight }; // inside its border
    if (box.width < 2 || box.height < 2) return; // hidden page: wait until it shows
    const ratio = window.devicePixelRatio || 1;
    const view = this.view;
    // Keep the world point at the centre where it was.
    const centre = this.toWorld(view.width / 2, view.height / 2);
    view.width = box.width;
    view.height = box.height;
    view.ratio = ratio;
    this.canvas.width = Math.round(box.width * ratio);
    this.canvas.height = Math.round(box.height * ratio);
    this.canvas.style.width = `${box.width}px`;
    this.canvas.style.height = `${box.height}px`;
    if (!this.fitted) this.fit();
    else this.centreOn(...centre);
    this.requestDraw();
  }

  fit() {
    const { width, height } = this.content;
    const view = this.view;
    const pad = this.padding;
    view.scale = Math.max(1e-6, Math.min((view.width - 2 * pad) / width, (view.height - 2 * pad) / height));
    view.x = (view.width - width * view.scale) / 2;
    view.y = (view.height - height * view.scale) / 2;
    this.fitScale = view.scale;
    this.fitted = true;
    this.requestDraw();
  }

  centreOn(wx, wy) {
    this.view.x = this.view.width / 2 - wx * this.view.scale;
    this.view.y = this.view.height / 2 - wy * this.view.scale;
    this.requestDraw();
  }

  toWorld(x, y) {
    return [(x - this.view.x) / this.view.scale, (y - this.view.y) / this.view.scale];
  }

  toScreen(wx, wy) {
    return [this.view.x + wx * this.view.scale, this.view.y + wy * this.view.scale];
  }

  /** Zoom by `factor` keeping the CSS pixel (cx, cy) fixed (the centre by default). */
  zoomBy(factor, cx = this.view.width / 2, cy = this.view.height / 2) {
    const view = this.view;
    const fitScale = this.fitScale || view.scale;
    const scale = Math.min(fitScale * 400, Math.max(fitScale * 0.5, view.scale * factor));
    const [wx, wy] = this.toWorld(cx, cy);
    view.scale = scale;
    view.x = cx - wx * scale;
    view.y = cy - wy * scale;
    this.requestDraw();
  }

  /** The zoom keys every view shares: + or = zooms in, - out, 0 frames it all. Returns whether
   * the key was one of them. */
  zoomKey(key) {
    if (key === "+" || key === "=") this.zoomBy(1.5);
    else if (key === "-") this.zoomBy(1 / 1.5);
    else if (key === "0") this.fit();
    else return false;
    return true;
  }

  panBy(dx, dy) {
    this.view.x += dx;
    this.view.y += dy;
    this.requestDraw();
  }

  requestDraw() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      const { context, view } = this;
      context.setTransform(1, 0, 0, 1, 0, 0);
      context.clearRect(0, 0, this.canvas.width, this.canvas.height);
      this.drawFrame(context, view);
    });
  }

  // -- pointer ----------------------------------------------------------------------------------
  local(event) {
    const box = this.canvas.getBoundingClientRect();
    return [event.clientX - box.left, event.clientY - box.top];
  }

  wheel(event) {
    event.preventDefault();
    const [x, y] = this.local(event);
    const pixels = event.deltaMode === 1 ? event.deltaY * 16 : event.deltaY;
    this.zoomBy(Math.exp(-pixels * 0.0015), x, y);
  }

  pointerDown(event) {
    if (event.button !== 0) return;
    const [x, y] = this.local(event);
    this.pointer = { id: event.pointerId, startX: x, startY: y, lastX: x, lastY: y, dragging: false };
  }

  pointerMove(event) {
    const [x, y] = this.local(event);
    const pointer = this.pointer;
    if (pointer && pointer.id === event.pointerId) {
      if (!pointer.dragging && Math.hypot(x - pointer.startX, y - pointer.startY) > DRAG_THRESHOLD_PX) {
        pointer.dragging = true;
        this.canvas.setPointerCapture(event.pointerId);
        this.canvas.classList.add("dragging");
        this.onHover(null, event);
      }
      if (pointer.dragging) {
        this.panBy(x - pointer.lastX, y - pointer.lastY);
        pointer.lastX = x;
        pointer.lastY = y;
        return;
      }
    }
    this.onHover(this.toWorld(x, y), event);
  }

  pointerUp(event) {
    const pointer = this.pointer;
    this.pointer = null;
    this.canvas.classList.remove("dragging");
    if (!pointer || pointer.id !== event.pointerId) return;
    if (pointer.dragging) {
      this.canvas.releasePointerCapture(event.pointerId);
      return;
    }
    const [x, y] = this.local(event);
    this.onClick(this.toWorld(x, y), event);
  }
}
