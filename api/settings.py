"""The API's settings: one object, the environment read once (`Settings.from_environment`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

MIB = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    home: Path
    open_access: bool = False
    max_upload_bytes: int = 20 * MIB  # CELLATLAS_MAX_UPLOAD_MB
    pointer_check_s: float = 1.0  # how often ATLAS_HOME/current is looked at, at most
    corrections_refresh_s: float = 1.0  # how stale corrections made by other processes may be
    key_cache_s: float = 10.0  # how long a verified key is trusted without the catalogue

    @classmethod
    def from_environment(cls, home: Path | str, open_access: bool = False,
                         environ: Mapping[str, str] = os.environ) -> Settings:
        """Settings for serving `home`, the defaults replaced by what the environment sets:
        CELLATLAS_MAX_UPLOAD_MB (megabytes, default 20)."""
        max_upload_mb = float(environ.get("CELLATLAS_MAX_UPLOAD_MB", "20"))
        return cls(home=Path(home), open_access=open_access,
                   max_upload_bytes=int(max_upload_mb * MIB))
