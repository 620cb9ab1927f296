"""What routes share, injected with `Depends`: the live atlas (reloaded when ATLAS_HOME/current
changes), the corrections log, the caller's key and role, uploaded images."""

from __future__ import annotations

import gc
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import Depends, File, HTTPException, Query, Request, UploadFile, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api import schemas
from api.auth import OPEN_ACCESS, KeyVerifier, Principal
from api.jobs import RebuildLauncher
from api.metrics import RequestMetrics
from api.settings import Settings
from api.views import AtlasView, image_url
from atlas.archive import Archive, DescribedUpload
from atlas.catalog import Catalog
from atlas.ingest import content_hash
from atlas.reference import LoadedAtlas
from atlas.scale import UM_PER_PIXEL_RANGE, read_upload
from atlas.store import AtlasNotFound, AtlasStore

log = logging.getLogger("cellatlas.api")


class LiveAtlas:
    """The LoadedAtlas of the live version. `get()` looks at the `current` pointer at most once
    per `check_s`; a new version is loaded by one request while the others keep the old object,
    then swapped in with one assignment, so in-flight requests finish on the version they had."""

    def __init__(self, home: Path, check_s: float = 1.0):
        self.store = AtlasStore(home)
        self.check_s = check_s
        self._atlas: LoadedAtlas | None = None
        self._next_check = 0.0
        self._failed: str | None = None  # a version that could not be loaded: not retried
        self._loading = threading.Lock()

    def get(self) -> LoadedAtlas:
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + self.check_s
            version = self.store.current_version()
            atlas = self._atlas
            if version is not None and version != self._failed and (atlas is None or atlas.version != version):
                self._load(version)
        atlas = self._atlas
        if atlas is None:
            self.store.require_current()  # raises AtlasNotFound with what to do
            raise AtlasNotFound(f"atlas version {self._failed} in {self.store.home} cannot be loaded; see the server log")
        return atlas

    def _load(self, version: str) -> None:
        # With nothing to serve, wait for the loader; otherwise keep serving the old version.
        if not self._loading.acquire(blocking=self._atlas is None):
            return
        try:
            if self._atlas is not None and self._atlas.version == version:
                return
            started = time.perf_counter()
            self._atlas = LoadedAtlas(self.store.home, version)
            # A loaded atlas is millions of long-lived objects (1.5M at 1M cells): a full garbage
            # collection walked them in 0.5 s, a pause for whichever request it fell in. Collect
            # once now (the previous version's cycles too), then keep them out of later collections.
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            log.info("serving atlas version %s (loaded in %.1f s)", version, time.perf_counter() - started)
        except Exception:
            log.exception("cannot load atlas version %s; still serving %s", version,
                          self._atlas.version if self._atlas else "nothing")
            self._failed = version
        finally:
            self._loading.release()


class CatalogReading:
    """A value read from the catalogue (`read()`) and read again about once per `refresh_s`, in
    the background: a request gets the value at hand and never waits for the catalogue, except
    for the first read and the one after `changed()` (a change made in this process shows at
    once). Other processes' changes show within about `refresh_s` plus one read. Each read
    opens the catalogue (about 18 ms): made by requests, they were the slowest 1% of
    archived-cell lookups (p99 25 ms against a p50 of 5)."""

    def __init__(self, read, refresh_s: float = 1.0):
        self.read = read
        self.refresh_s = refresh_s
        self._value = None
        self._fresh = False  # False: the next get() reads now (never read, or changed here)
        self._generation = 0  # changed() counts up; a background read from before it is dropped
        self._next_refresh = 0.0
        self._refreshing = False
        self._lock = threading.Lock()

    def get(self):
        with self._lock:
            if not self._fresh:
                self._value = self.read()
                self._fresh = True
                self._next_refresh = time.monotonic() + self.refresh_s
            elif time.monotonic() >= self._next_refresh and not self._refreshing:
                self._refreshing = True
                threading.Thread(target=self._refresh, args=(self._generation,), daemon=True,
                                 name="catalogue-refresh").start()
            return self._value

    def _refresh(self, generation: int) -> None:
        try:
            value, failed = self.read(), False
        except Exception:  # a background thread: log it and keep the value at hand
            log.exception("reading the catalogue failed; the value at hand is kept")
            value, failed = None, True
        with self._lock:
            if not failed and generation == self._generation:
                self._value = value
            self._next_refresh = time.monotonic() + self.refresh_s
            self._refreshing = False

    def changed(self) -> None:
        with self._lock:
            self._fresh = False
            self._generation += 1


class CorrectionLog:
    """The catalogue's append-only corrections, as the API reads them: the effective labels are
    cached for `refresh_s` (corrections made by other processes show within that time); a
    correction made here shows at once."""

    def __init__(self, catalog: Catalog, refresh_s: float = 1.0):
        self.catalog = catalog
        self._labels = CatalogReading(catalog.effective_labels, refresh_s)

    def effective_labels(self) -> tuple[int, dict[str, str]]:
        """(the latest correction_id, {cell_id: latest new_label})."""
        return self._labels.get()

    def add(self, cell_id: str, old_label: str | None, new_label: str, note: str | None,
            author: str, atlas_version: str, db=None) -> schemas.Correction:
        """Store a correction; `db`: inside a caller's catalogue transaction (api.idempotency),
        which must call `changed()` once it has committed."""
        correction = self.catalog.add_correction(cell_id, old_label, new_label, note, author,
                                                 atlas_version, db=db)
        if db is None:
            self.changed()
        return schemas.Correction(**correction)

    def changed(self) -> None:
        """The next read sees corrections committed until now."""
        self._labels.changed()

    def page(self, cell_id: str | None, author: str | None, limit: int, cursor: int | None) -> schemas.CorrectionPage:
        """Newest first; `cursor` is the last correction_id of the previous page."""
        rows = self.catalog.corrections(cell_id=cell_id, author=author, limit=limit + 1, before=cursor)
        items = [schemas.Correction(**row) for row in rows[:limit]]
        return schemas.CorrectionPage(items=items, next_cursor=items[-1].correction_id if len(rows) > limit else None)


class ArchiveLayer:
    """Cells archived one at a time and withdrawn cells, laid over the live version
    (`atlas.archive`): the catalogue is looked at at most once per `refresh_s` (other processes'
    changes show within that time); a change made here shows at once. One amended atlas per
    (version, catalogue state), shared by every request."""

    def __init__(self, archive: Archive, refresh_s: float = 1.0):
        self.archive = archive
        self._stamp = CatalogReading(archive.catalog.archive_stamp, refresh_s)
        self._amended: tuple[LoadedAtlas, tuple, LoadedAtlas] | None = None
        self._lock = threading.Lock()

    def applied_to(self, atlas: LoadedAtlas) -> LoadedAtlas:
        stamp = self._stamp.get()
        with self._lock:
            cached = self._amended
            if cached is None or cached[0] is not atlas or cached[1] != stamp:
                cached = self._amended = (atlas, stamp, self.archive.applied_to(atlas))
            return cached[2]

    def describe(self, view: AtlasView, upload: UploadedImage, label: str) -> DescribedUpload:
        """The uploaded cell prepared and embedded by the live models (the slow part, done
        outside any catalogue transaction); nothing is stored yet."""
        return self.archive.describe_upload(view.atlas, upload.image, upload.sha256, view.check_label(label),
                                            upload.decoded_um_per_pixel)

    def archive_cell(self, view: AtlasView, described: DescribedUpload, source: str | None, author: str,
                     db=None) -> schemas.ArchivedCell:
        """Persist the cell (files, then catalogue), then serve it: the next view holds it.
        `db`: inside a caller's catalogue transaction (api.idempotency), which must call
        `changed()` once it has committed."""
        archived = self.archive.store(view.atlas, described, source, author, db=db)
        if db is None:
            self.changed()
        row = archived.row
        return schemas.ArchivedCell(
            cell_id=archived.cell_id, label=archived.label, source=source, author=author,
            created_at=archived.created_at, version=view.version, image_url=image_url(archived.cell_id),
            prediction=schemas.Prediction(
                label=row["predicted_label"], entropy_bits=row["entropy_bits"], flagged=row["flagged"],
                probabilities=dict(zip(view.classes, (float(p) for p in row["probabilities"]), strict=True))))

    def withdraw(self, view: AtlasView, cell_id: str, reason: str, author: str) -> schemas.Withdrawal:
        event = self.archive.withdraw(view.base, cell_id, reason, author)
        self.changed()
        return schemas.Withdrawal(**event)

    def restore(self, view: AtlasView, cell_id: str, reason: str, author: str) -> schemas.Withdrawal:
        event = self.archive.restore(view.base, cell_id, reason, author)
        self.changed()
        return schemas.Withdrawal(**event)

    def changed(self) -> None:
        """The next view reads the catalogue's archive state again."""
        self._stamp.changed()


class ApiState:
    """Everything one app instance holds; kept on `app.state.cellatlas`."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.catalog = Catalog(settings.home)
        self.live = LiveAtlas(settings.home, settings.pointer_check_s)
        self.corrections = CorrectionLog(self.catalog, settings.corrections_refresh_s)
        self.rebuilds = RebuildLauncher(settings.home, self.catalog)
        self.metrics = RequestMetrics()
        self.keys = KeyVerifier(self.catalog, settings.key_cache_s)
        self.archive = ArchiveLayer(Archive(settings.home, self.catalog), settings.corrections_refresh_s)
        self._view: AtlasView | None = None
        self._view_lock = threading.Lock()

    def view(self) -> AtlasView:
        """The live version with the cells archived and withdrawn since, and the current
        corrections applied (one snapshot per state)."""
        atlas = self.archive.applied_to(self.live.get())
        stamp, labels = self.corrections.effective_labels()
        with self._view_lock:
            view = self._view
            if view is None or view.base is not atlas or view.corrections_stamp != stamp:
                view = self._view = AtlasView(atlas, labels, stamp)
        return view


# -- dependencies ------------------------------------------------------------------------------
def get_state(request: Request) -> ApiState:
    return request.app.state.cellatlas


def get_view(state: Annotated[ApiState, Depends(get_state)]) -> AtlasView:
    return state.view()


State = Annotated[ApiState, Depends(get_state)]
View = Annotated[AtlasView, Depends(get_view)]

bearer = HTTPBearer(auto_error=False, description="an API key made with `cellatlas keys create`")


def current_principal(state: State,
                      credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Principal:
    if state.settings.open_access:
        return OPEN_ACCESS
    if credentials is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED,
                            "missing API key: send 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})
    principal = state.keys.verify(credentials.credentials)
    if principal is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid or revoked API key",
                            headers={"WWW-Authenticate": "Bearer"})
    return principal


def require(role: str):
    """A dependency that lets through keys of `role` or a higher one, and answers 403 to others."""

    def check(principal: Annotated[Principal, Depends(current_principal)]) -> Principal:
        if not principal.has_role(role):
            raise HTTPException(status.HTTP_403_FORBIDDEN,
                                f"this needs the {role} role; the key {principal.name!r} has {principal.role}")
        return principal

    return check


Reviewer = Annotated[Principal, Depends(require("reviewer"))]
Technologist = Annotated[Principal, Depends(require("technologist"))]
Admin = Annotated[Principal, Depends(require("admin"))]


UmPerPixel = Annotated[float | None, Query(
    ge=UM_PER_PIXEL_RANGE[0], le=UM_PER_PIXEL_RANGE[1], allow_inf_nan=False,
    description="the image's scale in um per pixel (default: the atlas's); the image is resampled "
                "to the atlas's scale before segmentation")]


@dataclass
class UploadedImage:
    image: np.ndarray  # decoded no larger than the atlas's scale needs (atlas.scale.read_upload)
    sha256: str
    shape: tuple[int, int]  # (height, width) of the image as uploaded: answers speak its pixels
    um_per_pixel: float | None  # the upload's scale as given (None: the atlas's)
    decoded_um_per_pixel: float | None  # `image`'s scale, the reduction at decode folded in


class UploadTooLarge(ValueError):
    """An upload above the byte limit."""


def uploaded_image(image: Annotated[UploadFile, File(description="a cell image (JPEG, PNG, TIFF, BMP)")],
                   state: State, view: View, um_per_pixel: UmPerPixel = None) -> UploadedImage:
    """The decoded upload, reduced at decode to what segmentation at the atlas's scale needs;
    413 above the byte limit or the working pixel limit, 400 when it is not a readable image."""
    limit = state.settings.max_upload_bytes
    data = image.file.read(limit + 1)
    if len(data) > limit:
        raise UploadTooLarge(f"the image is larger than the {limit // (1024 * 1024)} MB allowed")
    decoded, decoded_um_per_pixel = read_upload(data, um_per_pixel, view.atlas.um_per_pixel,
                                                state.settings.max_working_pixels)
    width, height = decoded.size
    return UploadedImage(image=decoded.image, sha256=content_hash(data), shape=(height, width),
                         um_per_pixel=um_per_pixel, decoded_um_per_pixel=decoded_um_per_pixel)


Upload = Annotated[UploadedImage, Depends(uploaded_image)]
