"""The sweep's record on disk: the Parquet schema declared once (``schema``), the atomic writer
(``writer``), the readers (``readers``), local folders or URIs (``storage``), and the check
of a record before a resume (``quarantine``).

May import: config, outcomes, pyarrow, yaml. Never imports: Ray, torch, training, engine.
"""
