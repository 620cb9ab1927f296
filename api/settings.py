"""The API's settings: one object, the environment read once (`Settings.from_environment`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from atlas.scale import MAX_WORKING_PIXELS

MIB = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    home: Path
    open_access: bool = False
    max_upload_bytes: int = 20 * MIB  # CELLATLAS_MAX_UPLOAD_MB
    # The most pixels one upload is segmented at, at the atlas's scale; more is refused (413)
    # from the image's header. CELLATLAS_MAX_WORKING_MEGAPIXELS.
    max_working_pixels: int = MAX_WORKING_PIXELS
    # Uploads decoded and segmented at once (each holds up to a few hundred MB and one core);
    # CELLATLAS_MAX_CONCURRENT_UPLOADS. One more waits up to `upload_wait_s` for a free place
    # (CELLATLAS_UPLOAD_WAIT_S), then gets 503 with Retry-After.
    max_concurrent_uploads: int = 2
    upload_wait_s: float = 2.0
    pointer_check_s: float = 1.0  # how often ATLAS_HOME/current is looked at, at most
    corrections_refresh_s: float = 1.0  # how stale corrections made by other processes may be
    key_cache_s: float = 10.0  # how long a verified key is trusted without the catalogue

    @classmethod
    def from_environment(cls, home: Path | str, open_access: bool = False,
                         environ: Mapping[str, str] = os.environ) -> Settings:
        """Settings for serving `home`, the defaults replaced by what the environment sets:
        CELLATLAS_MAX_UPLOAD_MB (megabytes, default 20), CELLATLAS_MAX_WORKING_MEGAPIXELS
        (default 6), CELLATLAS_MAX_CONCURRENT_UPLOADS (default 2), CELLATLAS_UPLOAD_WAIT_S
        (seconds, default 2)."""
        def number(name: str, default: float, kind=float, low: float = 0) -> float:
            text = environ.get(name)
            try:
                value = kind(text) if text is not None else default
            except ValueError:
                raise ValueError(f"{name} must be a number, got {text!r}") from None
            if not value >= low:
                raise ValueError(f"{name} must be at least {low}, got {text!r}")
            return value

        return cls(home=Path(home), open_access=open_access,
                   max_upload_bytes=int(number("CELLATLAS_MAX_UPLOAD_MB", 20) * MIB),
                   max_working_pixels=int(number("CELLATLAS_MAX_WORKING_MEGAPIXELS",
                                                 MAX_WORKING_PIXELS / 1e6, low=0.01) * 1e6),
                   max_concurrent_uploads=number("CELLATLAS_MAX_CONCURRENT_UPLOADS", 2, int, 1),
                   upload_wait_s=number("CELLATLAS_UPLOAD_WAIT_S", 2.0))
