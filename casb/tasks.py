"""Stopping background tasks at shutdown, bounded.

Every background loop (policy polling, JWKS refresh, checkpoint timer) is stopped the
same way: cancelled, then awaited for at most `timeout` seconds. A loop that ignores its
cancellation (on Python 3.11 `asyncio.wait_for` can swallow one; use `asyncio.timeout`
in loops) is named in a warning and left behind, so shutdown still reaches the audit
log's final checkpoint instead of waiting until the process is killed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("casb.tasks")

STOP_TIMEOUT = 2.0  # seconds to wait for cancelled tasks to finish


async def stop_tasks(
    tasks: Iterable[asyncio.Task[Any] | None], what: str, timeout: float = STOP_TIMEOUT
) -> None:
    """Cancel `tasks` (None entries are skipped) and wait for them, at most `timeout`
    seconds. A task that ended with an error, or is still running, is named in the log
    (with the error's type only: errors may carry URLs with credentials)."""
    pending = {t for t in tasks if t is not None}
    if not pending:
        return
    for task in pending:
        task.cancel()
    done, stuck = await asyncio.wait(pending, timeout=timeout)
    for task in done:
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("%s: %s ended with %s", what, task.get_name(), type(exc).__name__)
    if stuck:
        names = ", ".join(sorted(t.get_name() for t in stuck))
        log.warning("%s: %s did not stop within %g s", what, names, timeout)
