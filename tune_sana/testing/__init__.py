"""Builders for tests and benchmarks, shipped with the package so that bench/ never imports
tests/ (as optuna.testing does): a tiny Sana pipeline checkpoint made in code (and a tiny
transformer of each Sana family), a checkpoint that depends on fp16's attention clip, a counter
of the tensor memory code holds (``peak``), and synthetic sweep records with known answers.
Nothing in tune_sana imports this package.
"""
