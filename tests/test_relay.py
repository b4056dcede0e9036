"""The trial-side relay: rows go to Ray in batches, the rows that matter at once."""

from __future__ import annotations

import json
from typing import Any

from tune_sana.engine.relay import ROWS_KEY, STEPS_KEY, RowRelay, unpack


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(every_s: float = 1.0, max_rows: int = 1000) -> tuple[RowRelay, list[Any], Clock]:
    sent: list[Any] = []
    clock = Clock()
    relay = RowRelay(lambda result, ckpt: sent.append((result, ckpt)), "val_loss",
                     every_s=every_s, max_rows=max_rows, clock=clock)
    return relay, sent, clock


def test_plain_steps_wait_until_the_interval_passes() -> None:
    relay, sent, clock = make(every_s=1.0)
    for step in range(5):
        relay.add({"step": step, "train_loss": 1.0})
    assert sent == [] and relay.waiting == 5
    clock.now = 1.0
    relay.add({"step": 5, "train_loss": 0.5})
    assert len(sent) == 1 and relay.waiting == 0
    result, checkpoint = sent[0]
    assert checkpoint is None
    assert result["step"] == 5 and result[STEPS_KEY] == 5 and result["train_loss"] == 0.5
    assert [r["step"] for r in json.loads(result[ROWS_KEY])] == [0, 1, 2, 3, 4]


def test_metric_outcome_and_checkpoint_rows_go_at_once() -> None:
    relay, sent, _ = make(every_s=60.0)
    relay.add({"step": 0, "train_loss": 1.0})
    relay.add({"step": 1, "train_loss": 1.0, "val_loss": 0.9})
    assert len(sent) == 1 and [r["step"] for r in json.loads(sent[0][0][ROWS_KEY])] == [0]
    relay.add({"step": 2, "train_loss": 1.0}, checkpoint="ckpt")
    assert sent[1][1] == "ckpt" and ROWS_KEY not in sent[1][0]
    relay.add({"step": 3, "outcome": "diverged", "divergence_cause": "nonfinite_loss"})
    assert sent[2][0]["outcome"] == "diverged" and sent[2][0][STEPS_KEY] == 3
    relay.add({"outcome": "error", "error": "ValueError: x"})  # no step: no clock key
    assert STEPS_KEY not in sent[3][0]


def test_a_none_metric_is_not_an_evaluation() -> None:
    relay, sent, _ = make(every_s=60.0)
    relay.add({"step": 0, "val_loss": None})
    assert sent == []


def test_max_rows_and_every_zero() -> None:
    relay, sent, _ = make(every_s=60.0, max_rows=3)
    for step in range(1, 8):  # a step counts updates done
        relay.add({"step": step})
    assert [r[STEPS_KEY] for r, _ in sent] == [3, 6] and relay.waiting == 1
    relay.flush()
    relay.flush()  # nothing waiting: no empty result
    assert [r[STEPS_KEY] for r, _ in sent] == [3, 6, 7]
    relay, sent, _ = make(every_s=0.0)
    for step in range(3):
        relay.add({"step": step})
    assert len(sent) == 3


def test_unpack_restores_every_row_in_order_with_its_time() -> None:
    relay, sent, clock = make(every_s=1.0)
    rows = [{"step": s, "train_loss": 1.0 / (s + 1)} for s in range(4)]
    for row in rows[:3]:
        relay.add(row)
    clock.now = 5.0
    relay.add(rows[3])
    unpacked = unpack(sent[0][0])
    assert [{k: v for k, v in r.items() if k != "timestamp"} for r in unpacked] == rows
    times = [r["timestamp"] for r in unpacked]
    assert times == sorted(times) and all(isinstance(t, float) for t in times)


def test_unpack_of_a_plain_ray_result_is_one_row() -> None:
    assert unpack({"step": 3, "val_loss": 0.2}) == [{"step": 3, "val_loss": 0.2}]
