"""`casb audit export`: the audit trail, or a time window of it, for compliance tooling.

    casb audit export [FILE] [--from T] [--to T] [--format jsonl|atna] [--output OUT]

jsonl writes the records' original lines verbatim (each keeps its hash, so a collector
can re-check every record and the links between consecutive ones). atna writes one RFC
5424 syslog message per line, each a DICOM PS3.15 A.5 audit message (syslog.py, atna.py);
checkpoints have no ATNA message and are left out.

The window is on each record's "time": from inclusive, to exclusive. T is an ISO 8601
date (a UTC day: 2025-01-31) or a date-time with Z or an offset (2025-01-31T08:00+01:00);
a date-time without a zone is refused rather than guessed. Records are in chain order,
not strictly time order (a record is written when its request ends), so the whole file
is read.

The hash chain is checked first, over the whole file, before anything is written: a
broken file is refused (exit 1, naming the line) with no output, unless --no-verify.
The export then streams the records the check covered (lines appended meanwhile wait for
the next export) and checks them again as it goes, so a file changed between the two
reads is refused too; --output is written to a temporary file and renamed only on
success. Memory use does not grow with the file. (Signed checkpoints are checked by
`casb audit verify`.)

Exit codes: 0 exported, 1 the file is tampered with or a record cannot be exported,
2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import socket
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from casb.audit.chain import GENESIS_HASH, read_entry
from casb.audit.syslog import header_field, rfc5424_message

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
Format = Literal["jsonl", "atna"]


class Writer(Protocol):
    """Where an export goes: a binary file, sys.stdout.buffer, a socket's makefile..."""

    def write(self, data: bytes, /) -> object: ...


class ExportError(Exception):
    """A line of the audit file cannot be exported (tampered with, or malformed)."""

    def __init__(
        self, line: int, problem: str, *, tampered: bool = False, partial: bool = False
    ) -> None:
        super().__init__(f"line {line}: {problem}")
        self.line = line
        self.problem = problem
        self.tampered = tampered  # the line does not continue the hash chain
        self.partial = partial  # lines before it may have been written already


@dataclass(frozen=True, slots=True)
class ExportResult:
    records: int  # records read
    exported: int  # records written (messages, for atna)


# -- time window ----------------------------------------------------------------------
def parse_bound(text: str) -> datetime:
    """--from/--to: a date (UTC midnight) or a date-time with a zone."""
    try:
        if len(text) == 10:
            return datetime.combine(date.fromisoformat(text), datetime.min.time(), UTC)
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 date or date-time") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} has no time zone: add Z or an offset such as +01:00"
        )
    return value


def record_time(record: dict[str, Any]) -> datetime:
    value = record.get("time")
    if not isinstance(value, str):
        raise ValueError("the record has no time")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"the record time {value!r} is not ISO 8601") from None
    if parsed.tzinfo is None:
        raise ValueError(f"the record time {value!r} has no time zone")
    return parsed


def in_window(at: datetime, start: datetime | None, end: datetime | None) -> bool:
    return (start is None or at >= start) and (end is None or at < end)


# -- chain ----------------------------------------------------------------------------
class ChainCheck:
    """Checks JSONL lines one at a time as continuations of the hash chain (chain.py:
    hash = record_hash, seq 1, 2, ..., prev_hash linking to the previous hash)."""

    def __init__(self) -> None:
        self.seq = 0
        self.prev_hash = GENESIS_HASH

    def check(self, lineno: int, raw: bytes) -> dict[str, Any]:
        """The parsed record; ExportError (tampered) if the line does not continue the
        chain."""
        record, problem = read_entry(raw, self.seq + 1, self.prev_hash)
        if record is None:
            raise ExportError(lineno, problem, tampered=True)
        self.seq, self.prev_hash = self.seq + 1, record["hash"]
        return record


def parse_line(lineno: int, raw: bytes) -> dict[str, Any]:
    if not raw.endswith(b"\n"):
        raise ExportError(lineno, "truncated: the line has no newline at its end")
    try:
        record = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ExportError(lineno, "not valid JSON (truncated or edited)") from None
    if not isinstance(record, dict):
        raise ExportError(lineno, "not a JSON object")
    return record


def verify_file(path: Path) -> int:
    """Check the whole chain; the number of lines checked. ExportError on the first bad
    line."""
    check = ChainCheck()
    count = 0
    with path.open("rb") as fh:
        for count, raw in enumerate(fh, start=1):
            check.check(count, raw)
    return count


# -- export ---------------------------------------------------------------------------
def export_lines(
    lines: Iterable[bytes],
    out: Writer,
    *,
    fmt: Format,
    start: datetime | None = None,
    end: datetime | None = None,
    verify: bool = True,
    source_id: str = "casb",
    hostname: str = "-",
) -> ExportResult:
    """Stream `lines` (a JSONL audit log) to `out`. ExportError names the first line
    that is broken (verify), lacks a time the window needs, or has no valid message."""
    check = ChainCheck() if verify else None
    windowed = start is not None or end is not None
    records = exported = 0
    parse = check is None and (windowed or fmt == "atna")
    for lineno, raw in enumerate(lines, start=1):
        records += 1
        record = None
        if check is not None:
            record = check.check(lineno, raw)
        elif parse:
            record = parse_line(lineno, raw)
        if windowed:
            assert record is not None
            try:
                at = record_time(record)
            except ValueError as exc:
                raise ExportError(lineno, str(exc)) from None
            if not in_window(at, start, end):
                continue
        if fmt == "jsonl":
            out.write(raw)
            exported += 1
            continue
        assert record is not None
        try:
            msg = rfc5424_message(record, fmt="atna", source_id=source_id, hostname=hostname)
        except ValueError as exc:
            raise ExportError(lineno, f"no ATNA message: {exc}") from None
        if msg is not None:
            out.write(msg + b"\n")
            exported += 1
    return ExportResult(records, exported)


def export_file(
    path: Path,
    out: Writer,
    *,
    fmt: Format,
    start: datetime | None = None,
    end: datetime | None = None,
    verify: bool = True,
    source_id: str = "casb",
    hostname: str = "-",
) -> ExportResult:
    """Verify the whole file first (nothing is written if it is broken), then export the
    lines that were verified, checking them again as they stream."""
    limit = verify_file(path) if verify else None
    with path.open("rb") as fh:
        lines: Iterable[bytes] = fh if limit is None else itertools.islice(fh, limit)
        try:
            return export_lines(
                lines,
                out,
                fmt=fmt,
                start=start,
                end=end,
                verify=verify,
                source_id=source_id,
                hostname=hostname,
            )
        except ExportError as exc:
            # Verified a moment ago: a chain problem now means the file was changed.
            changed = " (the file changed during the export)" if exc.tampered and verify else ""
            raise ExportError(
                exc.line, exc.problem + changed, tampered=exc.tampered, partial=True
            ) from None


# -- command --------------------------------------------------------------------------
def add_export_command(asub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `casb audit export` on the `casb audit` subcommands."""
    p = asub.add_parser(
        "export",
        help="export the audit trail (JSONL, or DICOM/IHE ATNA syslog messages)",
        description="Export audit records, optionally a time window of them: jsonl writes "
        "the original lines (hashes intact); atna one RFC 5424 syslog message per line, "
        "each a DICOM PS3.15 A.5 audit message (MSGID IHE+DICOM). The hash chain is "
        "checked first: a tampered file is refused (exit 1, naming the line) with no "
        "output. --from is inclusive, --to exclusive; each is a date (a UTC day) or a "
        "date-time with Z or an offset.",
    )
    p.add_argument(
        "file", metavar="FILE", nargs="?", type=Path, help="audit log (default: audit.path)"
    )
    p.add_argument(
        "--from", dest="start", type=parse_bound, metavar="T", help="first time (inclusive)"
    )
    p.add_argument("--to", dest="end", type=parse_bound, metavar="T", help="end (exclusive)")
    p.add_argument("--format", choices=("jsonl", "atna"), default="jsonl", help="default jsonl")
    p.add_argument("--output", "-o", type=Path, metavar="OUT", help="write here, not stdout")
    p.add_argument(
        "--no-verify", action="store_true", help="do not check the hash chain (not recommended)"
    )
    p.add_argument(
        "--source-id", metavar="ID", help="ATNA AuditSourceID (default: audit.source_id)"
    )
    p.add_argument(
        "--hostname", metavar="NAME", help="syslog HOSTNAME (default: this machine's name)"
    )
    p.add_argument("--config", "-c", metavar="FILE", help="casb.yaml (for the defaults)")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    if args.start is not None and args.end is not None and args.start >= args.end:
        return _usage("--from must be before --to")
    path, source_id = args.file, args.source_id
    if path is None or (source_id is None and args.format == "atna"):
        from casb.config import ConfigError, load_settings

        try:
            settings = load_settings(args.config)
        except ConfigError as exc:
            return _usage(str(exc))
        path = path or settings.audit.path
        source_id = source_id or settings.audit.source_id
    hostname = args.hostname or socket.gethostname() or "-"
    try:
        header_field("HOSTNAME", hostname, 255)
    except ValueError as exc:
        return _usage(f"{exc} (pass --hostname)")
    if not path.is_file():
        return _usage(f"{path}: no such audit log")
    kwargs: dict[str, Any] = {
        "fmt": args.format,
        "start": args.start,
        "end": args.end,
        "verify": not args.no_verify,
        "source_id": source_id or "casb",
        "hostname": hostname,
    }
    try:
        if args.output is None:
            result = export_file(path, sys.stdout.buffer, **kwargs)
            sys.stdout.buffer.flush()
        else:
            result = _export_to(path, args.output, kwargs)
    except ExportError as exc:
        if not exc.partial or args.output is not None:
            outcome = "nothing exported"
        else:
            outcome = "the output written before it is incomplete"
        print(f"casb: {path}: {exc}; {outcome}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:
        raise  # `... | head`: casb.cli.main ends quietly
    except OSError as exc:
        return _usage(f"{exc.filename or path}: {exc.strerror}")
    print(
        f"casb: exported {result.exported} of {result.records} records from {path}",
        file=sys.stderr,
    )
    return EXIT_OK


def _export_to(path: Path, output: Path, kwargs: dict[str, Any]) -> ExportResult:
    """Write to a temporary file beside `output`, renamed over it only on success."""
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            result = export_file(path, out, **kwargs)
        os.replace(tmp, output)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return result


def _usage(message: str) -> int:
    print(f"casb: error: {message}", file=sys.stderr)
    return EXIT_USAGE
