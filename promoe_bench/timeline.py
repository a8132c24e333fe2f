"""The timeline: every timed event of a run, one row each, in timeline.csv.gz.

Times are seconds since the strategy's runtime started (its `Clock`), so a strategy's repeats and
batches follow one another on one axis. Lanes and kinds:
- compute: step (a whole forward), per layer non_expert (attention, norms: from the previous MoE block's
  end), moe (the MoE block) holding router, expert (one expert's compute, after its gate and up chunks
  landed) and stall (compute waiting for a copy); head (final norm and LM head, after the last layer);
- predictor: predict, from `layer`'s input to `target`'s experts;
- copy: one row per chunk that crossed the link, with its bytes, expert, priority when copied,
  queued_s (when its expert was requested; host time) and preempted (its task was dropped by early
  preemption, so the bytes were wasted);
- cache: occupancy, an instant: bytes of the cache's slots in use after a layer's experts ran.
Rows carry the run context too (strategy, repeat, warmup, batch, phase).
"""

import pandas as pd

COLUMNS = ("step", "layer", "lane", "kind", "start_s", "end_s", "bytes", "expert", "target", "priority",
           "queued_s", "preempted")
LANES = ("compute", "predictor", "copy", "cache")


def event(step, layer, lane: str, kind: str, start_s: float, end_s: float, **fields) -> dict:
    assert lane in LANES, lane
    row = dict.fromkeys(COLUMNS)
    row.update(step=step, layer=layer, lane=lane, kind=kind, start_s=start_s, end_s=end_s, **fields)
    return row


def frame(rows: list[dict]) -> pd.DataFrame:
    return typed(pd.DataFrame(rows))


def typed(table: pd.DataFrame) -> pd.DataFrame:
    """Integer columns stay integer where cells may be blank (a copy has no target, a step no layer)."""
    for column in ("step", "layer", "bytes", "expert", "target"):
        if column in table:
            table[column] = table[column].astype("Int64")
    return table
