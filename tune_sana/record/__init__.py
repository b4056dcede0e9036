"""The sweep's record on disk: the Parquet schema declared once (``schema``), the atomic writer
(``writer``), the readers (``readers``), and local folders or URIs (``storage``).

May import: config, outcomes, pyarrow, yaml. Never imports: Ray, torch, training, engine.
"""
