"""Local model files: the catalog, the on-disk cache, the bundled model and downloads."""
