"""stop_tasks: cancelled background tasks are awaited, but never for longer than the
timeout, so shutdown reaches the audit log's final checkpoint."""

from __future__ import annotations

import asyncio
import logging

import pytest

from casb.tasks import stop_tasks


async def test_cancelled_tasks_are_awaited_and_none_entries_skipped() -> None:
    loop = asyncio.create_task(asyncio.Event().wait(), name="casb-test-loop")
    await asyncio.sleep(0)
    await stop_tasks([loop, None], "test")
    assert loop.cancelled()


async def test_a_task_that_ignores_its_cancellation_is_named_and_left_behind(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await release.wait()  # what a loop whose cancellation was swallowed does

    task = asyncio.create_task(stubborn(), name="casb-stubborn")
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="casb.tasks"):
        await stop_tasks([task], "test", timeout=0.05)
    assert not task.done()
    assert "casb-stubborn did not stop within 0.05 s" in caplog.text
    release.set()
    await task


async def test_a_task_that_failed_is_logged_by_its_error_type_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def failing() -> None:
        raise ValueError("https://user:secret@idp.example/jwks")

    task = asyncio.create_task(failing(), name="casb-failing")
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, logger="casb.tasks"):
        await stop_tasks([task], "test")
    assert "casb-failing ended with ValueError" in caplog.text
    assert "secret" not in caplog.text
