// Reviewing one cell: the query in the centre of a 3x3 grid of its 8 reference cells, the
// predicted class with its uncertainty, the labels of the nearest 100, the segmentation outline,
// the features against the class ranges, and the "correct label" action.
// `ReviewView` is the reusable panel (the review page and the review queue both show one);
// `ReviewPage` adds picking a cell by id and uploading an image.

import { ApiError, cellImage, cellPath, fetchBlob, getJSON, postImage, postJSON, withQuery } from "./api.js";
import { barChart, classColour, el, fill, number, swatch, toast } from "./ui.js";

const KEY_FEATURES = [
  "cell_area_um2", "nucleus_area_um2", "nucleus_to_cell_area_ratio", "nucleus_to_cytoplasm_area_ratio",
  "nucleus_lobes", "cell_circularity", "nucleus_circularity", "nucleus_solidity", "nucleus_lab_l_mean",
  "cytoplasm_lab_l_mean", "cytoplasm_lab_b_mean", "cytoplasm_thickness_um",
];
const CELL_OUTLINE_RGB = [40, 230, 90];
const NUCLEUS_OUTLINE_RGB = [255, 214, 0];
let featurePositionsEndpoint = true; // GET /v1/cells/{id}/feature-positions (viewer_support); false after a 404

export class ReviewView {
  /** onReviewed(cellId, label): after a correction or an accept (the queue moves on). */
  constructor(app, { queueMode = false, onReviewed = () => {} } = {}) {
    this.app = app;
    this.queueMode = queueMode;
    this.onReviewed = onReviewed;
    this.method = "latent";
    this.showOutline = true;
    this.generation = 0; // answers for a cell no longer shown are dropped
    this.subject = null; // {kind: "cell", cellId, detail} | {kind: "upload", file}
    this.root = el("div", { class: `review-view${queueMode ? " compact" : ""}` });
    this.renderEmpty();
  }

  renderEmpty(message) {
    this.root.replaceChildren(el("div", { class: "empty-state" },
      el("p", {}, message || "Pick a cell on the map, in the review queue or on the projection, " +
        "type a cell id above, or drop a cell image here.")));
  }

  // -- what to show ---------------------------------------------------------------------------
  async showCell(cellId, { suggestion } = {}) {
    const generation = ++this.generation;
    this.subject = { kind: "cell", cellId, suggestion };
    this.layout();
    this.gridPane.setAttribute("aria-busy", "true");
    try {
      const [detail, references] = await Promise.all([
        getJSON(cellPath(cellId)),
        this.fetchReferences(),
      ]);
      if (generation !== this.generation) return;
      this.subject.detail = detail;
      this.renderGrid(references, detail);
      this.renderPrediction(references.prediction, references.novelty); // the stored prediction, with its set
      this.renderDistribution(references.label_distribution);
      this.renderCorrection(detail);
      this.loadOutline(generation, () => fetchBlob(detail.image_url));
      this.loadFeatures(generation, detail);
    } catch (error) {
      if (generation === this.generation) this.renderEmpty(failure("open this cell", error));
    }
  }

  async showUpload(file) {
    const generation = ++this.generation;
    this.subject = { kind: "upload", file };
    this.layout();
    this.gridPane.setAttribute("aria-busy", "true");
    try {
      const references = await this.fetchReferences();
      if (generation !== this.generation) return;
      this.renderGrid(references, null);
      this.renderPrediction(references.prediction, references.novelty);
      this.renderDistribution(references.label_distribution);
      this.correctionPanel.replaceChildren(el("h3", {}, "Label"),
        el("p", { class: "muted" }, "An uploaded image is not in the archive, so it has no label to correct."));
      this.loadOutline(generation, async () => file);
      this.loadFeatures(generation, null);
    } catch (error) {
      if (generation === this.generation) this.renderEmpty(failure("review this image", error));
    }
  }

  fetchReferences() {
    const params = { k: 8, method: this.method };
    if (this.subject.kind === "upload") return postImage(withQuery("/v1/reference-cells", params), this.subject.file);
    return getJSON(withQuery(`${cellPath(this.subject.cellId)}/reference-cells`, params));
  }

  async setMethod(method) {
    this.method = method;
    if (!this.subject?.detail && this.subject?.kind !== "upload") return;
    const generation = this.generation;
    this.gridPane.setAttribute("aria-busy", "true");
    try {
      const references = await this.fetchReferences();
      if (generation !== this.generation) return;
      this.renderGrid(references, this.subject.detail || null, { keepQuery: true });
      this.renderDistribution(references.label_distribution);
    } catch (error) {
      toast(failure("load the reference cells", error), "error");
    }
  }

  // -- layout ------------------------------------------------------------------------------------
  layout() {
    const methodToggle = el("fieldset", { class: "method-toggle" },
      el("legend", {}, "Reference cells by"),
      ...[["latent", "latent space"], ["som", "SOM node"]].map(([value, text]) =>
        el("label", {},
          el("input", { type: "radio", name: `method-${this.queueMode ? "queue" : "page"}`, value,
                        checked: this.method === value, onchange: () => this.setMethod(value) }),
          ` ${text}`)));
    const outlineToggle = el("label", { class: "outline-toggle" },
      el("input", { type: "checkbox", checked: this.showOutline, onchange: (e) => {
        this.showOutline = e.target.checked;
        this.drawQuery();
      } }), " outline");
    this.grid = el("div", { class: "reference-grid", id: this.queueMode ? null : "reference-grid" });
    this.gridPane = el("section", { class: "grid-pane", "aria-label": "Query cell and its reference cells" },
      el("div", { class: "grid-controls" }, methodToggle, outlineToggle), this.grid);
    this.predictionPanel = el("section", { class: "panel prediction-panel", "aria-label": "Prediction" });
    this.correctionPanel = el("section", { class: "panel label-panel", "aria-label": "Label" });
    this.distributionPanel = el("section", { class: "panel distribution-panel", "aria-label": "Nearest 100" });
    this.featuresPanel = el("section", { class: "panel features-panel", "aria-label": "Features" },
      el("h3", {}, "Features against class ranges"), el("p", { class: "muted" }, "Loading…"));
    this.root.replaceChildren(this.gridPane,
      el("div", { class: "review-side" },
        this.predictionPanel, this.correctionPanel, this.distributionPanel, this.featuresPanel));
  }

  renderGrid(references, detail, { keepQuery = false } = {}) {
    const classes = this.app.atlas.classes;
    const tiles = references.references.map((ref, rank) => el("figure", { class: "tile reference" },
      el("a", { href: `#/review/${encodeURIComponent(ref.cell_id)}`, title: `Review cell ${ref.cell_id}` },
        cellImage(ref.image_url, `reference ${rank + 1}: ${ref.label ?? "unlabelled"}`)),
      el("figcaption", {},
        el("span", { class: "tile-label" }, swatch(classColour(classes, ref.label)), el("b", {}, ref.label ?? "unlabelled")),
        el("span", { class: "tile-sub" }, `#${rank + 1} · d ${ref.distance.toPrecision(3)}`))));
    while (tiles.length < 8) tiles.push(el("figure", { class: "tile missing" }, el("figcaption", {}, "no more cells")));
    if (!keepQuery || !this.queryTile) this.queryTile = this.makeQueryTile(detail);
    tiles.splice(4, 0, this.queryTile);
    this.grid.replaceChildren(...tiles);
    this.gridPane.removeAttribute("aria-busy");
    this.grid.dataset.method = references.method;
  }

  makeQueryTile(detail) {
    this.queryCanvas = el("canvas", { class: "query-canvas", width: 256, height: 256, role: "img",
                                      "aria-label": "the query cell with its segmentation outline" });
    this.queryLabel = el("b", { id: this.queueMode ? null : "query-label" }, detail ? (detail.label ?? "unlabelled") : "uploaded image");
    const caption = el("figcaption", {},
      el("span", { class: "tile-label" }, "Query: ", this.queryLabel),
      el("span", { class: "tile-sub", title: detail ? detail.cell_id : this.subject.file.name },
        detail ? detail.cell_id : this.subject.file.name));
    this.queryImage = null;
    this.queryView = null;
    this.outlines = null;
    const source = detail ? cellImage(detail.image_url, "", { eager: true }) : el("img", { src: URL.createObjectURL(this.subject.file) });
    source.addEventListener("load", () => {
      this.queryImage = source;
      this.drawQuery();
    });
    return el("figure", { class: "tile query" }, this.queryCanvas, caption);
  }

  /** The query image (for uploads: the main cell's box, once segmented) and its outlines. */
  drawQuery() {
    const canvas = this.queryCanvas;
    const image = this.queryImage;
    if (!canvas || !image) return;
    const context = canvas.getContext("2d");
    const [sx, sy, size] = this.queryView || squareAround(0, 0, image.naturalWidth, image.naturalHeight, image);
    context.fillStyle = "#fff";
    context.fillRect(0, 0, canvas.width, canvas.height);
    context.drawImage(image, sx, sy, size, size, 0, 0, canvas.width, canvas.height);
    if (this.showOutline && this.outlines) {
      context.imageSmoothingEnabled = false;
      context.drawImage(this.outlines, sx, sy, size, size, 0, 0, canvas.width, canvas.height);
    }
  }

  async loadOutline(generation, imageBlob) {
    try {
      const segmentation = await postImage("/v1/segment", await imageBlob(), "cell.jpg");
      if (generation !== this.generation || !segmentation.cells.length) return;
      const main = segmentation.cells[0];
      this.outlines = outlineCanvas(segmentation.width, segmentation.height, main);
      if (this.subject.kind === "upload") {
        const { row0, col0, row1, col1 } = main.bbox;
        this.queryView = squareAround(col0, row0, col1, row1, { naturalWidth: segmentation.width,
                                                                 naturalHeight: segmentation.height }, 0.25);
      }
      this.queryCanvas.setAttribute("aria-label",
        `the query cell; outline from ${segmentation.segmenter} segmentation: cell ${main.cell_area_px} px, nucleus ${main.nucleus_area_px} px`);
      this.drawQuery();
    } catch (error) {
      if (generation === this.generation) this.queryCanvas.title = failure("outline the cell", error);
    }
  }

  // -- prediction and neighbours ---------------------------------------------------------------
  /** The predicted class, its prediction set (or, for atlases built before sets, the entropy
   *  against the threshold) and, when the archive holds nothing close, the novelty message. */
  renderPrediction(prediction, novelty) {
    const classes = this.app.atlas.classes;
    const threshold = this.app.atlas.flag_threshold_bits;
    const entropy = `entropy ${number(prediction.entropy_bits)} bits`;
    const set = prediction.prediction_set;
    const percent = set ? `${Math.round(prediction.coverage * 1000) / 10}%` : "";
    let flag;
    if (set && set.length === 0) {
      flag = el("p", { class: "flag uncertain", role: "status" }, el("strong", {}, "⚠ Uncertain"),
        ` no class fits this cell at ${percent} (${entropy}): a person should decide.`);
    } else if (set) {
      flag = el("p", { class: `flag ${prediction.flagged ? "uncertain" : "confident"}`, role: prediction.flagged ? "status" : null },
        el("strong", {}, prediction.flagged ? "⚠ Uncertain" : "✓ Confident"),
        ` prediction set at ${percent}: `, el("span", { class: "prediction-set" }, `{${set.join(", ")}}`),
        prediction.flagged ? ` — more than one class fits (${entropy}): a person should decide.` : ` (${entropy}).`);
    } else {
      flag = prediction.flagged
        ? el("p", { class: "flag uncertain", role: "status" },
            el("strong", {}, "⚠ Uncertain"),
            ` ${entropy}, above the ${number(threshold)}-bit threshold: a person should decide.`)
        : el("p", { class: "flag confident" },
            el("strong", {}, "✓ Confident"), ` ${entropy} (threshold ${number(threshold)}).`);
    }
    const novel = novelty && novelty.novel
      ? el("p", { class: "novelty", role: "status" }, el("strong", {}, "⚠ Novel:"),
          ` ${novelty.message} (p = ${novelty.p_value.toPrecision(2)}).`)
      : null;
    this.predictionPanel.replaceChildren(
      el("h3", {}, "Predicted class: ", el("span", { class: "predicted", id: this.queueMode ? null : "predicted-label" },
        swatch(classColour(classes, prediction.label)), prediction.label)),
      flag,
      novel,
      barChart(prediction.probabilities, classes, { highlight: prediction.label, caption: "Class probabilities" }));
  }

  renderDistribution(distribution) {
    const classes = this.app.atlas.classes;
    this.distributionPanel.replaceChildren(
      el("h3", {}, "Labels of the nearest 100"),
      Object.keys(distribution).length
        ? barChart(distribution, classes, { caption: "share among the 100 nearest archived cells, weighted by 1/distance" })
        : el("p", { class: "muted" }, "No labelled neighbours."));
  }

  // -- the label and its correction ------------------------------------------------------------
  renderCorrection(detail) {
    const classes = this.app.atlas.classes;
    const suggestion = this.subject.suggestion;
    this.currentLabel = el("b", { class: "current-label", id: this.queueMode ? null : "current-label" }, detail.label ?? "unlabelled");
    this.correctedNote = el("span", { class: "muted small" },
      detail.corrected ? ` corrected (built as ${detail.original_label ?? "unlabelled"})` : "");
    this.labelSelect = el("select", { name: "label", required: true, id: this.queueMode ? "queue-label-select" : "label-select" },
      ...classes.map((label) => el("option", { value: label, selected: label === (suggestion || detail.label) }, label)));
    this.noteInput = el("input", { type: "text", name: "note", maxlength: "2000", placeholder: "optional note",
                                   id: this.queueMode ? "queue-note" : "note" });
    this.status = el("p", { class: "status small", role: "status", "aria-live": "polite" });
    const form = el("form", { class: "correction-form", onsubmit: (e) => {
      e.preventDefault();
      this.correct(this.labelSelect.value, this.noteInput.value.trim() || null);
    } },
      el("label", { for: this.labelSelect.id }, "Correct label to"), this.labelSelect,
      el("label", { for: this.noteInput.id, class: "visually-hidden" }, "Note"), this.noteInput,
      el("div", { class: "button-row" },
        el("button", { type: "submit", class: "primary", id: this.queueMode ? null : "save-correction" },
          this.queueMode ? "Correct (c, Enter)" : "Save correction"),
        this.queueMode ? el("button", { type: "button", onclick: () => this.accept() }, "Accept label (a)") : null));
    fill(this.correctionPanel,
      el("h3", {}, "Label: ", this.currentLabel, this.correctedNote),
      suggestion && suggestion !== detail.label
        ? el("p", { class: "small" }, "Most of its reference cells say ", el("b", {}, suggestion), ".")
        : null,
      form, this.status);
  }

  focusCorrection() {
    this.labelSelect?.focus();
  }

  /** Keep the current label: recorded as a correction to the same label, which takes the cell
   * off the review queue and leaves an audit trail. */
  accept() {
    const detail = this.subject?.detail;
    if (!detail?.label) return;
    this.correct(detail.label, "accepted in review", { accepted: true });
  }

  async correct(label, note, { accepted = false } = {}) {
    const detail = this.subject?.detail;
    if (!detail) return;
    this.status.textContent = "Saving…";
    try {
      const correction = await postJSON(`${cellPath(detail.cell_id)}/corrections`, { label, note });
      detail.label = correction.new_label;
      detail.corrected = true;
      this.currentLabel.textContent = correction.new_label;
      this.queryLabel.textContent = correction.new_label;
      this.correctedNote.textContent = ` corrected by ${correction.author} (was ${correction.old_label ?? "unlabelled"})`;
      const message = accepted
        ? `Label ${correction.new_label} accepted.`
        : `Label changed from ${correction.old_label ?? "unlabelled"} to ${correction.new_label}.`;
      this.status.textContent = message;
      toast(message, "success");
      this.app.labelsChanged();
      this.onReviewed(detail.cell_id, correction.new_label);
    } catch (error) {
      const message = error instanceof ApiError && error.status === 403
        ? "Your API key may only read; corrections need a technologist key."
        : failure("save the correction", error);
      this.status.textContent = message;
      toast(message, "error");
    }
  }

  // -- features against the class ranges --------------------------------------------------------
  async loadFeatures(generation, detail) {
    try {
      const positions = await featurePositions(detail, this.subject);
      if (generation !== this.generation) return;
      this.renderFeatures(positions, detail);
    } catch (error) {
      if (generation === this.generation) {
        this.featuresPanel.replaceChildren(el("h3", {}, "Features against class ranges"),
          el("p", { class: "muted" }, failure("load the features", error)));
      }
    }
  }

  renderFeatures(positions, detail) {
    const classes = this.app.atlas.classes;
    const predicted = detail ? detail.predicted_label : null;
    let compareWith = (detail && detail.label) || predicted || classes[0];
    const select = el("select", { "aria-label": "class to compare with", onchange: (e) => {
      compareWith = e.target.value;
      draw();
    } }, ...classes.map((label) => el("option", { value: label, selected: label === compareWith }, label)));
    const keyTable = el("table", { class: "features" });
    const restTable = el("table", { class: "features" });
    const key = KEY_FEATURES.map((name) => positions.find((p) => p.feature === name)).filter(Boolean); // in KEY_FEATURES order
    const rest = positions.filter((p) => !KEY_FEATURES.includes(p.feature));
    const draw = () => {
      keyTable.replaceChildren(featureHead(), el("tbody", {}, key.map((p) => featureRow(p, compareWith, classes))));
      restTable.replaceChildren(featureHead(), el("tbody", {}, rest.map((p) => featureRow(p, compareWith, classes))));
    };
    draw();
    fill(this.featuresPanel,
      el("h3", {}, "Features against class ranges"),
      el("label", { class: "small" }, "Compare with ", select,
        el("span", { class: "muted" }, " (band: 2nd–98th percentile, tick: median)")),
      keyTable,
      rest.length ? el("details", {}, el("summary", {}, `All features (${rest.length} more)`), restTable) : null);
  }
}

function featureHead() {
  return el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Feature"), el("th", { scope: "col", class: "num" }, "Value"),
    el("th", { scope: "col" }, "Class range"), el("th", { scope: "col" }, "")));
}

function featureRow(position, label, classes) {
  const range = position.classes[label];
  const values = [position.value];
  for (const r of Object.values(position.classes)) values.push(r.p2, r.p98);
  const known = values.filter((v) => v !== null && Number.isFinite(v));
  const low = Math.min(...known);
  const high = Math.max(...known);
  const at = (v) => `${(100 * (v - low) / (high - low || 1)).toFixed(1)}%`;
  const track = el("span", { class: "range-track", "aria-hidden": "true" });
  if (range && range.p2 !== null && range.p98 !== null) {
    track.append(el("span", { class: "range-band",
      style: `left:${at(range.p2)};width:calc(${at(range.p98)} - ${at(range.p2)});background:${classColour(classes, label)}` }));
    if (range.p50 !== null) track.append(el("span", { class: "range-median", style: `left:${at(range.p50)}` }));
  }
  if (position.value !== null) track.append(el("span", { class: "range-value", style: `left:${at(position.value)}` }));
  const where = range?.position;
  return el("tr", {},
    el("th", { scope: "row" }, featureName(position.feature)),
    el("td", { class: "num" }, number(position.value)),
    el("td", { class: "range-cell", title: range ? `${label}: ${number(range.p2)} – ${number(range.p98)}, median ${number(range.p50)}` : "" }, track),
    el("td", { class: `position ${where || ""}` }, where || "–"));
}

function featureName(name) {
  return name.replace(/_um2$/, " (µm²)").replace(/_um$/, " (µm)").replaceAll("_", " ");
}

/** Features against class ranges: stored features of an archived cell (viewer_support endpoint;
 * without it, the crop sent to /v1/classify), or the upload's own through /v1/classify. */
async function featurePositions(detail, subject) {
  if (subject.kind === "upload") return (await postImage("/v1/classify", subject.file)).feature_positions;
  if (featurePositionsEndpoint) {
    try {
      return await getJSON(`${cellPath(detail.cell_id)}/feature-positions`);
    } catch (error) {
      if (!(error instanceof ApiError && (error.status === 404 || error.status === 405))) throw error;
      featurePositionsEndpoint = false;
    }
  }
  return (await postImage("/v1/classify", await fetchBlob(detail.image_url), "cell.jpg")).feature_positions;
}

// -- outlines ---------------------------------------------------------------------------------
/** COCO uncompressed RLE (column-major runs, zeros first) -> row-major Uint8Array. */
export function decodeRLE({ size: [height, width], counts }) {
  const mask = new Uint8Array(height * width);
  let position = 0;
  counts.forEach((run, i) => {
    if (i % 2 === 1) {
      for (let p = position; p < position + run; p++) mask[(p % height) * width + Math.floor(p / height)] = 1;
    }
    position += run;
  });
  return mask;
}

/** A transparent canvas (image size) with the cell's and the nucleus's borders, 2 px wide. */
function outlineCanvas(width, height, cell) {
  const image = new ImageData(width, height);
  for (const [rle, rgb] of [[cell.cell_mask, CELL_OUTLINE_RGB], [cell.nucleus_mask, NUCLEUS_OUTLINE_RGB]]) {
    const mask = decodeRLE(rle);
    const inside = (x, y) => x >= 0 && y >= 0 && x < width && y < height && mask[y * width + x] === 1;
    for (let y = 0; y < height; y++) {
      for (let x = 0; x < width; x++) {
        if (!inside(x, y)) continue;
        if (inside(x - 1, y) && inside(x + 1, y) && inside(x, y - 1) && inside(x, y + 1) &&
            inside(x - 2, y) && inside(x, y - 2)) continue;
        const offset = (y * width + x) * 4;
        image.data.set([...rgb, 255], offset);
      }
    }
  }
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  canvas.getContext("2d").putImageData(image, 0, 0);
  return canvas;
}

/** [x, y, side]: a square of the image around the box (x0, y0)-(x1, y1), with `margin` of its size. */
function squareAround(x0, y0, x1, y1, image, margin = 0) {
  const side = Math.max(x1 - x0, y1 - y0) * (1 + 2 * margin);
  const limit = Math.min(image.naturalWidth, image.naturalHeight);
  const size = Math.min(side, limit);
  const cx = (x0 + x1) / 2;
  const cy = (y0 + y1) / 2;
  const x = Math.min(Math.max(0, cx - size / 2), image.naturalWidth - size);
  const y = Math.min(Math.max(0, cy - size / 2), image.naturalHeight - size);
  return [x, y, size];
}

function failure(action, error) {
  return `Could not ${action}: ${error.message}`;
}

// -- the review page ----------------------------------------------------------------------------
export class ReviewPage {
  constructor(section, app) {
    this.app = app;
    this.view = new ReviewView(app);
    this.idInput = el("input", { id: "cell-id-input", type: "search", placeholder: "cell id, e.g. 3f81…-0",
                                 autocomplete: "off", spellcheck: false });
    this.fileInput = el("input", { type: "file", accept: "image/*", id: "upload-input", class: "visually-hidden",
                                   onchange: (e) => e.target.files[0] && this.upload(e.target.files[0]) });
    section.append(
      el("div", { class: "toolbar" },
        el("h2", {}, "Review"),
        el("form", { class: "inline-form", onsubmit: (e) => {
          e.preventDefault();
          const id = this.idInput.value.trim();
          if (id) app.navigate(`#/review/${encodeURIComponent(id)}`);
        } },
          el("label", { for: "cell-id-input" }, "Cell id"), this.idInput, el("button", { type: "submit" }, "Open")),
        el("span", {}, "or"),
        el("label", { for: "upload-input", class: "button", tabindex: "0", onkeydown: (e) => {
          if (e.key === "Enter" || e.key === " ") {
            e.preventDefault();
            this.fileInput.click();
          }
        } }, "Upload an image…"),
        this.fileInput,
        el("span", { class: "muted small" }, "(or drop one on this page)")),
      this.view.root);
    // Drag and drop anywhere on the review page.
    section.addEventListener("dragover", (e) => {
      if ([...e.dataTransfer.types].includes("Files")) {
        e.preventDefault();
        section.classList.add("dropping");
      }
    });
    section.addEventListener("dragleave", (e) => {
      if (e.target === section || !section.contains(e.relatedTarget)) section.classList.remove("dropping");
    });
    section.addEventListener("drop", (e) => {
      e.preventDefault();
      section.classList.remove("dropping");
      const file = [...e.dataTransfer.files].find((f) => f.type.startsWith("image/")) || e.dataTransfer.files[0];
      if (file) this.upload(file);
    });
  }

  show({ cellId }) {
    if (cellId && cellId !== this.view.subject?.cellId) {
      this.idInput.value = cellId;
      this.view.showCell(cellId);
    }
  }

  upload(file) {
    this.app.navigate("#/review", { quiet: true });
    this.idInput.value = "";
    this.view.showUpload(file);
    this.fileInput.value = "";
  }
}
