"""Shared fixtures for the DLP engine tests: a UID key, inspectors, pydicom's files.

Corpus generators live in tests/support/dicom_corpus.py (shared with other suites)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from casb.dlp.inspector import Inspector
from casb.dlp.profile import DlpProfile, DlpSettings
from tests.support.dicom_corpus import UID_KEY

InspectorFactory = Callable[..., Inspector]


@pytest.fixture
def make_inspector() -> InspectorFactory:
    def make(
        *,
        block: list[str] | None = None,
        deidentify: list[str] | None = None,
        settings: DlpSettings | None = None,
        key: bytes = UID_KEY,
    ) -> Inspector:
        profile = DlpProfile(block=block or [], deidentify=deidentify)
        return Inspector(profile, settings or DlpSettings(), uid_key=key)

    return make


@pytest.fixture
def scanner(make_inspector: InspectorFactory) -> Inspector:
    """Detect only: never blocks, never rewrites."""
    return make_inspector(key=b"")


@pytest.fixture
def deid(make_inspector: InspectorFactory) -> Inspector:
    """The basic profile, no options."""
    return make_inspector(deidentify=[])


@pytest.fixture(autouse=True)
def _no_pydicom_noise(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every DLP test: nothing the engine does may reach a log with a patient value."""
    caplog.set_level("DEBUG")
    yield
    for record in caplog.records:
        assert "SENTINEL" not in record.getMessage()
