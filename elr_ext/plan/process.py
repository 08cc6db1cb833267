"""Plans in processes of their own, run again when torch kills them (docs/planning.md, "Not fixed").

On torch 2.14.1 a process that builds diffusers models under FakeTensorMode sometimes corrupts its
heap and dies by SIGABRT or SIGSEGV, mostly in teardown and sometimes mid-plan. Whoever starts a plan
process (train.py --plan, the benchmarks, the tests) starts it through `run_plan_process`, which runs
it again after such a death, up to `PLAN_TRIES` times, and returns what the last run returned.
"""

from __future__ import annotations

import signal
import subprocess
from typing import Callable, Optional, Sequence

PLAN_TRIES = 3
CRASH_SIGNALS = (signal.SIGABRT, signal.SIGSEGV)


def crash_signal(returncode: Optional[int]) -> Optional[str]:
    """The name of the signal in CRASH_SIGNALS that ended a process with this return code, else None
    (an exit status, a timeout's None, or another signal such as SIGKILL are not torch's crash)."""
    if returncode is None or -returncode not in CRASH_SIGNALS:
        return None
    return signal.Signals(-returncode).name


def run_plan_process(cmd: Sequence[str], tries: int = PLAN_TRIES,
                     on_crash: Optional[Callable[[int, int, str], None]] = None,
                     **run_kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, **run_kwargs), again while the process dies by one of CRASH_SIGNALS, at most
    `tries` runs in all; on_crash(attempt, tries, signal name) after each such death. Returns the last
    CompletedProcess; subprocess.run's own errors (TimeoutExpired, ...) are raised as they are."""
    if tries < 1:
        raise ValueError(f"run_plan_process: tries must be >= 1, got {tries}")
    for attempt in range(1, tries + 1):
        done = subprocess.run(list(cmd), **run_kwargs)
        name = crash_signal(done.returncode)
        if name is None:
            return done
        if on_crash is not None:
            on_crash(attempt, tries, name)
    return done
