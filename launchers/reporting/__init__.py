"""Sweep reports: curves and tables per configuration, with seed statistics."""
