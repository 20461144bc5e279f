"""Datasets prepared through tensorflow-datasets builders of the project's own (no downloads)."""
