// CellAtlas viewer: the header (atlas version, counts, rebuild banner, sign-in) and the router
// between the pages (#/map, #/review, #/queue, #/projection). Talks to /v1 over HTTP only.

import { ApiError, getJSON, request, session } from "./api.js";
import { MapPage } from "./map.js";
import { ProjectionPage } from "./projection.js";
import { QueuePage } from "./queue.js";
import { ReviewPage } from "./review.js";
import { el, fill, plural, toast } from "./ui.js";

const REBUILD_POLL_MS = 15000;
const REBUILD_POLL_ACTIVE_MS = 3000;
const ATLAS_POLL_MS = 30000;

const $ = (id) => document.getElementById(id);

const app = {
  atlas: null, // GET /v1/atlas
  openAccess: false,
  pages: {},

  navigate(hash, { quiet = false } = {}) {
    if (quiet) history.replaceState(null, "", hash);
    else location.hash = hash;
  },

  /** A label changed here: counts, hits and the projection's colours are stale. */
  labelsChanged() {
    refreshAtlas();
    this.pages.map.invalidate();
    this.pages.projection.invalidate();
    if (!this.pages.queue.visible) this.pages.queue.stale = true; // corrected elsewhere: reload on the next visit
  },
};

// -- start: open access, a stored key, or the sign-in form ---------------------------------------
async function start() {
  let response;
  try {
    response = await fetch("/v1/atlas"); // no key: answers 200 only with open access
  } catch (error) {
    return showProblem(`The server cannot be reached (${error.message}).`);
  }
  if (response.ok) {
    app.openAccess = true;
    return enter(await response.json());
  }
  if (response.status === 401) {
    if (session.token) {
      try {
        return enter(await getJSON("/v1/atlas"));
      } catch (error) {
        if (!(error instanceof ApiError && error.status === 401)) return showProblem(error.message);
        session.token = null;
        return showSignIn("That API key is no longer valid; sign in again.");
      }
    }
    return showSignIn();
  }
  let detail = response.statusText;
  try {
    detail = (await response.json()).detail;
  } catch {
    // keep the status text
  }
  showProblem(response.status === 503 ? `No atlas is being served yet: ${detail}` : detail);
  if (response.status === 503) setTimeout(start, 10000);
}

function showSignIn(message = "") {
  hideAllPages();
  const input = el("input", { id: "api-key", type: "password", autocomplete: "off", required: true,
                              placeholder: "cak_…", spellcheck: false });
  const status = el("p", { class: "status", role: "alert" }, message);
  const form = el("form", { class: "signin", onsubmit: async (event) => {
    event.preventDefault();
    session.token = input.value.trim();
    try {
      enter(await getJSON("/v1/atlas"));
    } catch (error) {
      session.token = null;
      status.textContent = error.status === 401 ? "That key was not accepted." : error.message;
    }
  } },
    el("h2", {}, "Sign in"),
    el("p", {}, "Paste your CellAtlas API key (made with ", el("code", {}, "cellatlas keys create"),
      "). It is kept in this browser tab only and forgotten when the tab closes."),
    el("label", { for: "api-key" }, "API key"), input,
    el("button", { type: "submit", class: "primary" }, "Sign in"),
    status);
  $("page-signin").replaceChildren(form);
  $("page-signin").hidden = false;
  $("session").replaceChildren();
  input.focus();
}

function showProblem(message) {
  hideAllPages();
  $("page-signin").replaceChildren(el("div", { class: "empty-state" }, el("p", { role: "alert" }, message)));
  $("page-signin").hidden = false;
}

function enter(atlas) {
  $("page-signin").hidden = true;
  $("page-signin").replaceChildren();
  setAtlas(atlas);
  $("session").replaceChildren(app.openAccess
    ? el("span", { class: "badge open", title: "the server runs with --open: no API key is needed" }, "open access")
    : el("span", {},
        el("span", { class: "badge" }, "signed in"), " ",
        el("button", { type: "button", class: "link", onclick: () => {
          session.token = null;
          location.hash = "";
          location.reload();
        } }, "Sign out")));
  if (!app.pages.map) {
    app.pages = {
      map: new MapPage($("page-map"), app),
      review: new ReviewPage($("page-review"), app),
      queue: new QueuePage($("page-queue"), app),
      projection: new ProjectionPage($("page-projection"), app),
    };
    window.addEventListener("hashchange", route);
    pollRebuilds();
    setInterval(refreshAtlas, ATLAS_POLL_MS);
  }
  route();
}

// -- header ---------------------------------------------------------------------------------
function setAtlas(atlas) {
  const previous = app.atlas;
  app.atlas = atlas;
  $("atlas-info").replaceChildren(
    el("span", { id: "atlas-version", title: atlas.built_at ? `built ${atlas.built_at}` : "" }, `atlas ${atlas.version}`),
    el("span", {}, plural(atlas.cells, "cell")),
    el("span", {}, plural(atlas.classes.length, "class", "classes")),
    el("span", { id: "corrected-count" }, `${atlas.corrected_cells.toLocaleString()} corrected`),
    el("span", {}, `SOM ${atlas.som.rows}×${atlas.som.cols}`));
  if (!previous || previous.version !== atlas.version) showDrift();
  if (previous && previous.version !== atlas.version) {
    showBanner(`Atlas version ${atlas.version} is now live; the map and the projection show it.`, "done");
    app.pages.map.invalidate();
    app.pages.projection.invalidate();
    route();
  }
}

async function refreshAtlas() {
  try {
    setAtlas(await getJSON("/v1/atlas"));
  } catch {
    // keep showing what we have; the next poll tries again
  }
}

/** GET /v1/atlas/drift: a warning under the header while the cells added last drift from the
 * archive the models were trained on (the message says why and to retrain). */
async function showDrift() {
  const banner = $("drift-banner");
  try {
    const drift = await getJSON("/v1/atlas/drift");
    fill(banner, el("strong", {}, "Drift: "), el("span", {}, drift.message));
    banner.hidden = !drift.drift;
  } catch {
    banner.hidden = true; // an API without the route, or a key that may not read it
  }
}

function showBanner(text, kind) {
  const banner = $("rebuild-banner");
  banner.className = `banner ${kind}`;
  fill(banner, el("span", {}, text),
    kind === "done" ? el("button", { type: "button", class: "link", onclick: () => (banner.hidden = true) }, "Dismiss") : null);
  banner.hidden = false;
}

/** GET /v1/rebuilds ({items: [{state, progress: {step, done, total}}]}): a banner while one runs.
 * Stops quietly where the API has no such route or the key may not read it. */
async function pollRebuilds() {
  let jobs;
  try {
    const body = await (await request("/v1/rebuilds")).json();
    jobs = body.items || [];
  } catch (error) {
    if (error instanceof ApiError && [401, 403, 404, 405].includes(error.status)) return;
    setTimeout(pollRebuilds, REBUILD_POLL_MS);
    return;
  }
  const running = jobs.find((job) => job.state === "running");
  const banner = $("rebuild-banner");
  if (running) {
    const progress = running.progress || {}; // {step, done, total}
    const share = progress.total ? ` ${Math.round((100 * (progress.done || 0)) / progress.total)}%` : "";
    const step = progress.step || "";
    showBanner(`Rebuilding the atlas…${share}${step ? ` (${step})` : ""}. ` +
      "The current version keeps serving; corrections made now are kept for the next rebuild.", "running");
  } else if (banner.classList.contains("running")) {
    banner.hidden = true;
    banner.classList.remove("running");
    refreshAtlas();
  }
  setTimeout(pollRebuilds, running ? REBUILD_POLL_ACTIVE_MS : REBUILD_POLL_MS);
}

// -- router ---------------------------------------------------------------------------------
function hideAllPages() {
  for (const section of document.querySelectorAll("main > section")) section.hidden = true;
}

function route() {
  if (!app.atlas) return;
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  const name = app.pages[parts[0]] ? parts[0] : "map";
  hideAllPages();
  $(`page-${name}`).hidden = false;
  for (const link of document.querySelectorAll("nav a")) {
    if (link.dataset.page === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = `CellAtlas · ${document.querySelector(`nav a[data-page=${name}]`).textContent}`;
  const params = {
    map: () => ({ node: parts.length >= 3 ? [Number(parts[1]), Number(parts[2])] : null }),
    review: () => ({ cellId: parts.slice(1).join("/") || null }),
    queue: () => ({}),
    projection: () => ({}),
  }[name]();
  Promise.resolve(app.pages[name].show(params)).catch((error) => toast(error.message, "error"));
}

start();
