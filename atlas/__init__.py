"""CellAtlas domain library: segmentation, features, hashing, models, SOM, search, store.

`from atlas import Atlas` is the Python API (`atlas.python_api`); it is imported on first use
(PEP 562) so that `import atlas.cell` and the other light modules do not load torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from atlas.python_api import Atlas

__version__ = "0.1.0"
__all__ = ["Atlas", "__version__"]


def __getattr__(name: str):
    if name == "Atlas":
        from atlas.python_api import Atlas

        return Atlas
    raise AttributeError(f"module 'atlas' has no attribute {name!r}")
