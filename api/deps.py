"""What routes share, injected with `Depends`: the live atlas (reloaded when ATLAS_HOME/current
changes), the corrections log, the caller's key and role, uploaded images."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import Depends, File, HTTPException, Request, UploadFile, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api import schemas
from api.auth import OPEN_ACCESS, KeyVerifier, Principal
from api.jobs import RebuildLauncher
from api.metrics import RequestMetrics
from api.settings import Settings
from api.views import AtlasView
from atlas.catalog import Catalog
from atlas.ingest import content_hash, read_image_bytes
from atlas.reference import LoadedAtlas
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
            log.info("serving atlas version %s (loaded in %.1f s)", version, time.perf_counter() - started)
        except Exception:
            log.exception("cannot load atlas version %s; still serving %s", version,
                          self._atlas.version if self._atlas else "nothing")
            self._failed = version
        finally:
            self._loading.release()


class CorrectionLog:
    """The catalogue's append-only corrections, as the API reads them: the effective labels are
    cached for `refresh_s` (corrections made by other processes show within that time); a
    correction made here shows at once."""

    def __init__(self, catalog: Catalog, refresh_s: float = 1.0):
        self.catalog = catalog
        self.refresh_s = refresh_s
        self._labels: dict[str, str] = {}
        self._stamp = -1
        self._next_refresh = 0.0
        self._lock = threading.Lock()

    def effective_labels(self) -> tuple[int, dict[str, str]]:
        """(the latest correction_id, {cell_id: latest new_label})."""
        with self._lock:
            if time.monotonic() >= self._next_refresh:
                self._stamp, self._labels = self.catalog.effective_labels()
                self._next_refresh = time.monotonic() + self.refresh_s
            return self._stamp, self._labels

    def add(self, cell_id: str, old_label: str | None, new_label: str, note: str | None,
            author: str, atlas_version: str) -> schemas.Correction:
        correction = self.catalog.add_correction(cell_id, old_label, new_label, note, author, atlas_version)
        with self._lock:
            self._next_refresh = 0.0  # the next read sees this correction
        return schemas.Correction(**correction)

    def page(self, cell_id: str | None, author: str | None, limit: int, cursor: int | None) -> schemas.CorrectionPage:
        """Newest first; `cursor` is the last correction_id of the previous page."""
        rows = self.catalog.corrections(cell_id=cell_id, author=author, limit=limit + 1, before=cursor)
        items = [schemas.Correction(**row) for row in rows[:limit]]
        return schemas.CorrectionPage(items=items, next_cursor=items[-1].correction_id if len(rows) > limit else None)


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
        self._view: AtlasView | None = None
        self._view_lock = threading.Lock()

    def view(self) -> AtlasView:
        """The live version with the current corrections applied (one snapshot per state)."""
        atlas = self.live.get()
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


@dataclass
class UploadedImage:
    image: np.ndarray
    sha256: str


class UploadTooLarge(ValueError):
    """An upload above the byte limit."""


def uploaded_image(image: Annotated[UploadFile, File(description="a cell image (JPEG, PNG, TIFF, BMP)")],
                   state: State) -> UploadedImage:
    """The decoded upload; 413 above the byte limit, 400 when it is not a readable image."""
    limit = state.settings.max_upload_bytes
    data = image.file.read(limit + 1)
    if len(data) > limit:
        raise UploadTooLarge(f"the image is larger than the {limit // (1024 * 1024)} MB allowed")
    return UploadedImage(image=read_image_bytes(data), sha256=content_hash(data))


Upload = Annotated[UploadedImage, Depends(uploaded_image)]
