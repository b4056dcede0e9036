"""tune-sana: find Sana fine-tuning settings that train well and stay finite.

The package is a house with rooms; arrows point one way (tests/test_layout.py enforces them):

    cli -> engine -> training -> data -> config, outcomes, device
                  -> record
    cli -> analysis -> record -> config, outcomes

- ``config``, ``outcomes``: the trial's settings, and the words its result is told in.
- ``device``: which torch device, and its peak memory.
- ``data/``: encoded datasets, the built-in demo world, image folders, the encoding cache,
  checkpoint files.
- ``training/``: everything one trial needs (never imports Ray or the engine).
- ``engine/``: spaces, the sweep on Ray Tune, searchers, stopping, relay, recorder, preflight.
- ``record/``: the Parquet record (no Ray, no torch).
- ``analysis/``: tables, plots and answers from the record (no Ray, no torch).
- ``testing/``: builders for tests and benchmarks; nothing in the package imports it.
"""

__version__ = "0.1.0"
