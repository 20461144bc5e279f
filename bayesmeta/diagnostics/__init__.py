"""Diagnostics computed on fitted runs: memorization (here), calibration and landscape (later issues)."""
