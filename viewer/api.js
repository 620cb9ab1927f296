// The viewer's one door to the CellAtlas HTTP API: the API key, JSON bodies, errors that carry
// the server's own message, and cell images (which need the key too when access is not open).

const TOKEN_KEY = "cellatlas.api-key";

export class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

/** The API key lives in sessionStorage only: it is gone when the browser tab closes. */
export const session = {
  get token() {
    return sessionStorage.getItem(TOKEN_KEY);
  },
  set token(value) {
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    else sessionStorage.removeItem(TOKEN_KEY);
  },
};

export async function request(path, { method = "GET", json, form, signal } = {}) {
  const headers = {};
  if (session.token) headers.Authorization = `Bearer ${session.token}`;
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form) {
    body = form;
  }
  const response = await fetch(path, { method, headers, body, signal });
  if (!response.ok) {
    let detail = `${response.status} ${response.statusText}`;
    try {
      detail = (await response.json()).detail || detail;
    } catch {
      // not a JSON problem body; keep the status line
    }
    throw new ApiError(response.status, detail);
  }
  return response;
}

export const getJSON = async (path, options) => (await request(path, options)).json();

export const postJSON = async (path, json) => (await request(path, { method: "POST", json })).json();

/** POST an image file (or Blob) as the multipart field `image`. */
export async function postImage(path, image, name = "cell.png") {
  const form = new FormData();
  form.append("image", image, image.name || name);
  return (await request(path, { method: "POST", form })).json();
}

export function withQuery(path, params) {
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") query.set(key, value);
  }
  const text = query.toString();
  return text ? `${path}?${text}` : path;
}

export const cellPath = (cellId) => `/v1/cells/${encodeURIComponent(cellId)}`;

// -- images -------------------------------------------------------------------------------------
// With open access an <img loading="lazy"> fetches the crop itself. With an API key the browser
// cannot add the Authorization header to <img>, so the crop is fetched when the image nears the
// viewport and shown from a blob: URL (kept in a small cache).
const blobUrls = new Map();
const BLOB_CACHE = 400;

async function blobUrl(url) {
  if (!blobUrls.has(url)) {
    const promise = request(url).then(async (response) => URL.createObjectURL(await response.blob()));
    blobUrls.set(url, promise);
    promise.catch(() => blobUrls.delete(url));
    if (blobUrls.size > BLOB_CACHE) {
      const [oldest, oldPromise] = blobUrls.entries().next().value;
      blobUrls.delete(oldest);
      oldPromise.then((u) => URL.revokeObjectURL(u), () => {});
    }
  }
  return blobUrls.get(url);
}

function loadWithKey(img) {
  blobUrl(img.dataset.src).then(
    (url) => (img.src = url),
    () => img.classList.add("broken"),
  );
}

const nearViewport =
  "IntersectionObserver" in window
    ? new IntersectionObserver(
        (entries) => {
          for (const entry of entries) {
            if (entry.isIntersecting) {
              nearViewport.unobserve(entry.target);
              loadWithKey(entry.target);
            }
          }
        },
        { rootMargin: "300px" },
      )
    : null;

/** An <img> of an archived cell's crop, loaded lazily. */
export function cellImage(url, alt, { eager = false } = {}) {
  const img = document.createElement("img");
  img.alt = alt;
  img.decoding = "async";
  img.loading = eager ? "eager" : "lazy";
  if (!session.token) {
    img.src = url;
  } else {
    img.dataset.src = url;
    if (eager || !nearViewport) loadWithKey(img);
    else nearViewport.observe(img);
  }
  return img;
}

/** The crop as a Blob (to send it on to /v1/segment or /v1/classify). */
export async function fetchBlob(url) {
  return (await request(url)).blob();
}
