// Small DOM helpers shared by the pages: element building, class colours, bar charts, numbers.

/** el("div", {class: "x", onclick: f}, child, "text", ...) -> HTMLElement */
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key in node && typeof value !== "string") node[key] = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  return fill(node, ...children);
}

/** Replace `node`'s children; null, undefined and false children are left out. */
export function fill(node, ...children) {
  node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}

// Tableau 10: distinct, readable on white and on the grey U-matrix.
const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
                 "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];

/** A class's colour, fixed by its position in the atlas's class list. */
export function classColour(classes, label) {
  const index = classes.indexOf(label);
  if (index < 0) return "#888888";
  if (index < PALETTE.length) return PALETTE[index];
  return `hsl(${(index * 137.5) % 360} 55% 50%)`;
}

/** [r, g, b] of a "#rrggbb" or "hsl(...)" colour, via a 1x1 canvas (done once per class). */
const rgbCache = new Map();
export function colourRGB(colour) {
  if (!rgbCache.has(colour)) {
    const context = document.createElement("canvas").getContext("2d", { willReadFrequently: true });
    context.fillStyle = colour;
    context.fillRect(0, 0, 1, 1);
    const [r, g, b] = context.getImageData(0, 0, 1, 1).data;
    rgbCache.set(colour, [r, g, b]);
  }
  return rgbCache.get(colour);
}

export function swatch(colour) {
  return el("span", { class: "swatch", style: `background:${colour}`, "aria-hidden": "true" });
}

/**
 * A horizontal bar chart of shares (0..1), largest first. `highlight` names a row to emphasise.
 * Text carries every value, so the chart reads without colour.
 */
export function barChart(shares, classes, { highlight, caption } = {}) {
  const rows = Object.entries(shares).sort((a, b) => b[1] - a[1]);
  return el("table", { class: "bars" },
    caption ? el("caption", {}, caption) : null,
    el("tbody", {}, rows.map(([label, share]) =>
      el("tr", { class: label === highlight ? "highlight" : "" },
        el("th", { scope: "row" }, swatch(classColour(classes, label)), label),
        el("td", { class: "bar-cell" },
          el("span", { class: "bar", style: `width:${(100 * share).toFixed(1)}%;background:${classColour(classes, label)}` })),
        el("td", { class: "num" }, percent(share))))));
}

export function percent(share) {
  const value = 100 * share;
  return `${value < 9.95 ? value.toFixed(1) : value.toFixed(0)}%`;
}

export function number(value, digits = 2) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  const size = Math.abs(value);
  if (size >= 1000) return value.toFixed(0);
  if (size >= 100) return value.toFixed(1);
  return value.toFixed(digits);
}

export function plural(count, word, many = `${word}s`) {
  return `${count.toLocaleString()} ${count === 1 ? word : many}`;
}

/** True while the user types in a form field (page shortcuts stay quiet then). */
export function typing(event) {
  const target = event.target;
  return target instanceof HTMLElement &&
    (target.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(target.tagName));
}

/** Short-lived message at the bottom of the page, read out by screen readers. */
export function toast(message, kind = "info") {
  const box = document.getElementById("toast");
  box.textContent = message;
  box.className = `toast ${kind}`;
  box.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (box.hidden = true), 4000);
}
