"""The run's attempts, one JSON line each event in output_dir/attempts.jsonl (written by rank 0).

Every start of training records where it starts from (checkpoint, epoch, step, batch plan); an
attempt that ends records how (completed, preempted, or the error rank 0 saw). From these, a new
start can tell a failure that repeats: attempts that began at the same point with the same batch
plan and ended without a newer checkpoint (their successor began at that point again). Restarting
once more would replay the same batches into the same failure (an out-of-memory batch, a NaN, a bad
image), so that becomes the user's decision instead of a loop (see `repeated_failures`).

The file also records rewinds (--resume of one of the run's own older checkpoints), each applied once.
"""
from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

ATTEMPTS_FILE = "attempts.jsonl"
ERROR_CHARS = 300  # of an error's message kept in the file


@dataclass(frozen=True)
class StartPoint:
    """Where an attempt starts: the checkpoint's epoch, step and optimizer steps, and the batch plan."""
    epoch: int
    step: int
    global_step: int
    plan: Sequence[int]  # util.resume.BatchPlan: batch size per process, processes, seed, accum_steps

    def key(self) -> tuple:
        return self.epoch, self.step, self.global_step, tuple(self.plan)


def read(output_dir: Path) -> List[Dict[str, Any]]:
    """The events recorded so far (a line cut short by a crash is skipped)."""
    path = Path(output_dir) / ATTEMPTS_FILE
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def append(output_dir: Path, event: Dict[str, Any]) -> None:
    """One event, as one line written in one call and flushed to disk."""
    line = json.dumps({"time": datetime.datetime.now().isoformat(timespec="seconds"), **event}) + "\n"
    with open(Path(output_dir) / ATTEMPTS_FILE, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def next_attempt(events: Sequence[Dict[str, Any]]) -> int:
    return 1 + max((e.get("attempt", 0) for e in events), default=0)


def start_event(attempt: int, point: StartPoint, source: str, rewind_to: Optional[str] = None) -> Dict[str, Any]:
    event = {"attempt": attempt, "start": {"from": source, "epoch": point.epoch, "step": point.step,
                                           "global_step": point.global_step, "plan": list(point.plan)}}
    if rewind_to:
        event["rewind_to"] = rewind_to
    return event


def failure_event(attempt: int, epoch: int, step: int, error: BaseException) -> Dict[str, Any]:
    text = f"{type(error).__name__}: {error}".splitlines()[0][:ERROR_CHARS]
    return {"attempt": attempt, "failed": {"epoch": epoch, "step": step, "error": text}}


def _point(start: Dict[str, Any]) -> tuple:
    return start["epoch"], start["step"], start["global_step"], tuple(start["plan"])


def repeated_failures(events: Sequence[Dict[str, Any]], point: StartPoint) -> List[Dict[str, Any]]:
    """The latest attempts, newest first, that started at `point` (same batch plan) and did not end
    (completed or preempted): consecutive failures at the same point. Their failures, where rank 0
    recorded one, are under "failed"."""
    ended = {e["attempt"] for e in events if e.get("completed") or e.get("preempted")}
    failed = {e["attempt"]: e["failed"] for e in events if "failed" in e}
    repeated = []
    for event in reversed([e for e in events if "start" in e]):
        if _point(event["start"]) != point.key() or event["attempt"] in ended:
            break
        repeated.append({**event, **({"failed": failed[event["attempt"]]} if event["attempt"] in failed else {})})
    return repeated


def rewound_to(events: Sequence[Dict[str, Any]], name: str) -> Optional[int]:
    """The attempt that rewound the run to checkpoint `name`, if one did."""
    return next((e["attempt"] for e in events if e.get("rewind_to") == name), None)


def describe_failures(repeated: Sequence[Dict[str, Any]]) -> str:
    """One clause per failed attempt, oldest first."""
    parts = []
    for event in reversed(repeated):
        failed = event.get("failed")
        what = (f"at epoch {failed['epoch']}, step {failed['step']}: {failed['error']}" if failed
                else "no error recorded on rank 0 (a process was killed, or another rank failed)")
        parts.append(f"attempt {event['attempt']} {what}")
    return "; ".join(parts)
