"""Run by tests/test_resume_fallback.py under torchrun (two CPU processes): main.py's training,
with rank 1 stalled at one step for longer than --dist_timeout, as a hung peer would be.

usage: torchrun --nproc_per_node 2 tests/dist_timeout_check.py [main.py flags]
"""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import engine  # noqa: E402
import main  # noqa: E402

STALLED_RANK = 1
STALLED_STEP = 1
STALL_SECONDS = 30  # well beyond the test's --dist_timeout (6 s), well within its default (10 minutes)

_train_step = engine.train_step
calls = {"n": 0}


def stalling_train_step(*args, **kwargs):
    if int(os.environ["RANK"]) == STALLED_RANK and calls["n"] == STALLED_STEP:
        time.sleep(STALL_SECONDS)
    calls["n"] += 1
    return _train_step(*args, **kwargs)


if __name__ == "__main__":
    engine.train_step = stalling_train_step
    main.main(main.get_args_parser().parse_args(sys.argv[1:]))
