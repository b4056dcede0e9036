"""Builders for tests and benchmarks, shipped with the package so that bench/ never imports
tests/ (as optuna.testing does): a tiny Sana pipeline checkpoint made in code, and synthetic
sweep records with known answers. Nothing in tune_sana imports this package.
"""
