// The review queue: the most uncertain cells (and the suspect labels), walked one by one with the
// keyboard: j / ↓ / → next, k / ↑ / ← previous, a accept the label, c correct it.

import { cellImage, getJSON, withQuery } from "./api.js";
import { ReviewView } from "./review.js";
import { classColour, el, number, swatch, typing } from "./ui.js";

const QUEUE_LIMIT = 200;
const ADVANCE_DELAY_MS = 600; // long enough to see the new label before moving on

const SOURCES = {
  uncertain: { title: "Most uncertain", path: "/v1/review-queue", count: (page) => page.remaining },
  suspect: { title: "Suspect labels", path: "/v1/suspect-labels", count: (page) => page.total },
};

export class QueuePage {
  constructor(section, app) {
    this.app = app;
    this.section = section;
    this.kind = "uncertain";
    this.items = [];
    this.index = -1;
    this.reviewed = new Map(); // cell_id -> label given in this session
    this.stale = true;
    this.view = new ReviewView(app, { queueMode: true, onReviewed: (id, label) => this.reviewedCell(id, label) });
    this.tabs = Object.entries(SOURCES).map(([kind, source]) => el("button", {
      type: "button", role: "tab", class: "tab", dataset: { kind }, "aria-selected": String(kind === this.kind),
      onclick: () => this.switchTo(kind),
    }, source.title));
    this.list = el("ol", { class: "queue-list", id: "queue-list", "aria-label": "Cells to review" });
    this.summary = el("p", { class: "muted small", role: "status" });
    section.append(
      el("div", { class: "toolbar" },
        el("h2", {}, "Review queue"),
        el("div", { role: "tablist", class: "tabs", "aria-label": "Queue" }, ...this.tabs),
        el("button", { type: "button", onclick: () => this.load() }, "Refresh"),
        el("span", { class: "keys muted small" },
          el("kbd", {}, "j"), "/", el("kbd", {}, "↓"), " next · ", el("kbd", {}, "k"), "/", el("kbd", {}, "↑"), " previous · ",
          el("kbd", {}, "a"), " accept · ", el("kbd", {}, "c"), " correct · ", el("kbd", {}, "Esc"), " back to the list")),
      el("div", { class: "queue-body" },
        el("div", { class: "queue-pane" }, this.summary, this.list),
        this.view.root));
    document.addEventListener("keydown", (e) => this.key(e));
  }

  get visible() {
    return !this.section.hidden;
  }

  async show() {
    if (this.stale) await this.load();
  }

  switchTo(kind) {
    if (kind === this.kind) return;
    this.kind = kind;
    for (const tab of this.tabs) tab.setAttribute("aria-selected", String(tab.dataset.kind === kind));
    this.load();
  }

  async load() {
    this.stale = false;
    const source = SOURCES[this.kind];
    this.summary.textContent = "Loading…";
    try {
      const page = await getJSON(withQuery(source.path, { limit: QUEUE_LIMIT }));
      this.items = page.items;
      this.summary.textContent = this.kind === "uncertain"
        ? `${page.remaining} unreviewed cells, highest entropy first${page.remaining > this.items.length ? ` (first ${this.items.length})` : ""}.`
        : `${page.total} cells whose label disagrees with most of their ${this.items[0]?.k ?? 8} reference cells.`;
      this.renderList();
      if (this.items.length) this.select(0);
      else this.view.renderEmpty("Nothing to review here.");
    } catch (error) {
      this.summary.textContent = `Could not load the queue: ${error.message}`;
    }
  }

  renderList() {
    const classes = this.app.atlas.classes;
    this.list.replaceChildren(...this.items.map((item, i) => {
      const reviewedLabel = this.reviewed.get(item.cell_id);
      const detail = this.kind === "uncertain"
        ? `predicted ${item.predicted_label} · ${number(item.entropy_bits)} bits`
        : `${item.votes}/${item.k} references say ${item.majority_label}`;
      return el("li", { class: reviewedLabel ? "reviewed" : "", "aria-current": i === this.index ? "true" : null },
        el("button", { type: "button", class: "queue-item", onclick: () => this.select(i) },
          cellImage(item.image_url, ""),
          el("span", { class: "queue-text" },
            el("span", {}, swatch(classColour(classes, reviewedLabel || item.label)),
              el("b", {}, reviewedLabel || item.label || "unlabelled"), reviewedLabel ? " ✓" : ""),
            el("span", { class: "muted small" }, detail))));
    }));
  }

  select(index) {
    if (index < 0 || index >= this.items.length) return;
    this.index = index;
    const item = this.items[index];
    [...this.list.children].forEach((li, i) => {
      if (i === index) li.setAttribute("aria-current", "true");
      else li.removeAttribute("aria-current");
    });
    this.list.children[index]?.scrollIntoView({ block: "nearest" });
    this.view.showCell(item.cell_id, { suggestion: item.majority_label });
  }

  reviewedCell(cellId, label) {
    this.reviewed.set(cellId, label);
    const reviewedIndex = this.index;
    this.renderList();
    setTimeout(() => {
      if (this.index === reviewedIndex && this.visible) this.select(this.nextUnreviewed(reviewedIndex));
    }, ADVANCE_DELAY_MS);
  }

  nextUnreviewed(from) {
    for (let i = from + 1; i < this.items.length; i++) {
      if (!this.reviewed.has(this.items[i].cell_id)) return i;
    }
    return Math.min(from + 1, this.items.length - 1);
  }

  key(event) {
    if (!this.visible || event.ctrlKey || event.metaKey || event.altKey) return;
    if (typing(event)) {
      if (event.key === "Escape") event.target.blur();
      else if (event.key === "Enter" && event.target.tagName === "SELECT") {
        event.preventDefault();
        event.target.form?.requestSubmit();
      }
      return;
    }
    if (event.target instanceof HTMLElement && event.target.closest("canvas, [role=tab]") && event.key.startsWith("Arrow")) return;
    const actions = {
      j: () => this.select(this.index + 1),
      ArrowDown: () => this.select(this.index + 1),
      ArrowRight: () => this.select(this.index + 1),
      k: () => this.select(this.index - 1),
      ArrowUp: () => this.select(this.index - 1),
      ArrowLeft: () => this.select(this.index - 1),
      a: () => this.view.accept(),
      c: () => this.view.focusCorrection(),
    };
    const action = actions[event.key];
    if (action) {
      event.preventDefault();
      action();
    }
  }
}
