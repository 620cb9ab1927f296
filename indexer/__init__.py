"""CellAtlas batch jobs and the `cellatlas` command line."""
