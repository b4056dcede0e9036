"""Answers from the record alone: runs loaded with their effective configuration (``runs``),
tables (``tables``), text and HTML rendering (``render``), the report (``report``), charts
(``plots``) and the best configuration (``best``).

May import: config, outcomes, record, pyarrow, numpy, matplotlib.
Never imports: Ray, torch, training, engine.
"""
