"""Model catalog entries (cards): parsing, limits, schemas and serving policies."""
