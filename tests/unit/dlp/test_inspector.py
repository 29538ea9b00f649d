"""casb.dlp.inspector: the verdicts, fail-closed errors, and no PHI outside the request
path (findings, errors, logs, warnings)."""

from __future__ import annotations

import random
import warnings

import pytest

from casb.dlp.findings import InstanceError, Verdict
from casb.dlp.inspector import Inspector
from casb.dlp.profile import DlpProfile, DlpSettings
from tests.support.dicom_corpus import (
    INSTANCE_UID,
    PATIENT_NAME,
    add_nested_phi,
    add_private,
    bundled,
    ct_dataset,
    encode_instance,
    split_at_pixel_data,
)

from .conftest import InspectorFactory


def header() -> bytes:
    return split_at_pixel_data(add_nested_phi(add_private(ct_dataset())))[0]


def test_forward_keeps_the_bytes_and_reports_findings(scanner: Inspector) -> None:
    data = header()
    verdict = scanner.inspect(data, False)
    assert verdict.action == "forward"
    assert verdict.header == data
    assert verdict.findings
    assert verdict.blocked_by == ()
    assert verdict.sop_instance_uid == INSTANCE_UID
    assert verdict.sop_class_uid == ct_dataset().SOPClassUID


def test_complete_is_accepted_positionally_and_by_keyword(scanner: Inspector) -> None:
    """The stream layer calls inspect(header, complete) positionally."""
    data = header()
    assert scanner.inspect(data, False) == scanner.inspect(data, complete=False)


@pytest.mark.parametrize(
    ("block", "blocked_by"),
    [
        (["private_tag"], ("private_tag",)),
        (["free_text"], ("free_text.patient_name", "free_text.mrn")),
        (["free_text.mrn"], ("free_text.mrn",)),
        (["annex_e", "private_tag"], ("annex_e", "private_tag")),
    ],
)
def test_block_names_the_rules(
    make_inspector: InspectorFactory, block: list[str], blocked_by: tuple[str, ...]
) -> None:
    verdict = make_inspector(block=block, deidentify=[]).inspect(header(), False)
    assert verdict.action == "block"
    assert verdict.header == b""
    assert set(verdict.blocked_by) == set(blocked_by)
    assert verdict.sop_instance_uid == INSTANCE_UID  # for the STOW-RS failure item


def test_a_block_rule_with_nothing_to_find_does_not_block(make_inspector: InspectorFactory) -> None:
    verdict = make_inspector(block=["burned_in_annotation"]).inspect(header(), False)
    assert verdict.action == "forward"
    assert verdict.blocked_by == ()


def test_deidentified_verdict_keeps_the_original_uids(deid: Inspector) -> None:
    verdict = deid.inspect(header(), False)
    assert verdict.action == "deidentified"
    assert verdict.sop_instance_uid == INSTANCE_UID
    assert INSTANCE_UID.encode() not in verdict.header


def test_uids_fall_back_to_the_file_meta(scanner: Inspector) -> None:
    ds = ct_dataset()
    data = encode_instance(ds)
    del ds.SOPInstanceUID
    del ds.SOPClassUID
    verdict = scanner.inspect(encode_instance(ds), True)
    assert verdict.sop_instance_uid == INSTANCE_UID  # MediaStorageSOPInstanceUID
    bare = scanner.inspect(encode_instance(ds, framing="bare"), True)
    assert (bare.sop_class_uid, bare.sop_instance_uid) == ("", "")
    assert scanner.inspect(data, True).sop_instance_uid == INSTANCE_UID


def test_deidentifying_without_a_key_fails_closed(make_inspector: InspectorFactory) -> None:
    inspector = make_inspector(deidentify=[], key=b"")
    with pytest.raises(InstanceError, match="UID key"):
        inspector.inspect(header(), False)
    with pytest.raises(TypeError):
        Inspector(DlpProfile(), DlpSettings(), uid_key="text")  # type: ignore[arg-type]


def test_garbage_is_an_instance_error(deid: Inspector) -> None:
    for data in [b"", b"DICM", b"\x00" * 200, b"not dicom at all" * 10]:
        with pytest.raises(InstanceError):
            deid.inspect(data, False)


def test_mutated_headers_never_escape_as_another_error(
    deid: Inspector, make_inspector: InspectorFactory
) -> None:
    blocker = make_inspector(block=["annex_e"])
    rng = random.Random(1234)
    base = header()
    verdicts = errors = 0
    for _ in range(250):
        data = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(132, len(data))] = rng.getrandbits(8)
        for inspector in (deid, blocker):
            try:
                assert isinstance(inspector.inspect(bytes(data), False), Verdict)
                verdicts += 1
            except InstanceError as exc:
                assert "SENTINEL" not in exc.reason
                errors += 1
    assert verdicts and errors


def test_sentinel_never_leaves_the_request_path(
    make_inspector: InspectorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The patient's name is in the instance; it may be in what is forwarded, nowhere
    else: not in findings, not in errors, not in logs or warnings."""
    ds = add_nested_phi(add_private(ct_dataset()))
    ds.StudyDescription = f"{PATIENT_NAME} DOB 07/04/1961 tel 555-123-4567"
    whole = encode_instance(ds)
    head = split_at_pixel_data(add_nested_phi(add_private(ct_dataset())))[0]
    inspectors = [
        make_inspector(key=b""),
        make_inspector(block=["free_text"]),
        make_inspector(deidentify=["clean_descriptors", "retain_safe_private"]),
    ]
    texts: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for inspector in inspectors:
            for data, complete in [(whole, True), (head, False)]:
                verdict = inspector.inspect(data, complete)
                texts.extend(repr(f) for f in verdict.findings)
                texts.append(repr(verdict.blocked_by))
            for cut in range(40, len(whole), 97):  # truncated: errors
                try:
                    inspector.inspect(whole[:cut], True)
                except InstanceError as exc:
                    texts.append(exc.reason)
                    texts.append(str(exc))
    texts.extend(str(w.message) for w in caught)
    texts.extend(r.getMessage() for r in caplog.records)
    assert texts
    for text in texts:
        assert "SENTINEL" not in text.upper()
        assert "555-123-4567" not in text


def test_pydicom_test_files_all_give_a_verdict_or_an_instance_error(
    deid: Inspector, make_inspector: InspectorFactory
) -> None:
    names = [
        "CT_small.dcm",
        "MR_small.dcm",
        "rtplan.dcm",
        "JPEG2000.dcm",
        "MR_truncated.dcm",
        "image_dfl.dcm",
        "ExplVR_BigEnd.dcm",
        "UN_sequence.dcm",
        "nested_priv_SQ.dcm",
        "badVR.dcm",
        "reportsi.dcm",
        "waveform_ecg.dcm",
        "chrSQEncoding.dcm",
        "chrJapMulti.dcm",
        "chrKoreanMulti.dcm",
    ]
    blocker = make_inspector(block=["private_tag"])
    for name in names:
        for inspector in (deid, blocker):
            try:
                verdict = inspector.inspect(bundled(name), True)
            except InstanceError:
                assert name == "MR_truncated.dcm"
            else:
                assert verdict.action in ("deidentified", "block", "forward"), name
