"""CellAtlas domain library: segmentation, features, hashing, models, SOM, search, store."""

__version__ = "0.1.0"
