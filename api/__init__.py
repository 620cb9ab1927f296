"""CellAtlas HTTP API (FastAPI): versioned routes under /v1, auth by API key, health, metrics."""
