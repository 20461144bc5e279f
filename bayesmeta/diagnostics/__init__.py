"""Diagnostics computed on fitted runs: memorization, calibration, landscape and conflict metrics."""
