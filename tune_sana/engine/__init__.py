"""The sweep on Ray Tune: search spaces (``space``), the Tuner (``sweep``), searchers
(``search``), the divergence stopper (``stopping``), batched reporting (``relay``), the driver's
Parquet recorder (``recorder``), checks before launch (``preflight``; ``fit``: does each trial
fit in its share of a GPU), one sweep at a time per run directory (``runlock``), Ctrl-C
(``interrupt``), and re-running a trial to export its weights (``export``).

The only room that imports Ray (with cli). May import every other room.
"""
