"""Answers from the record alone: runs loaded with their effective configuration (``runs``),
the noise rule over a confirm stage's seeds (``noise``), tables (``tables``), text and HTML
rendering (``render``), the report (``report``), charts (``plots``) and the best
configuration (``best``).

May import: config, outcomes, record, pyarrow, numpy, matplotlib.
Never imports: Ray, torch, training, engine.
"""
