"""The two errors of envelope encryption, in a module of their own so that the keyring
(which raises them on unwrap) and the format (which re-exports them) do not import each
other.

Both carry a short message that is safe to show a client: it names what failed (a
metadata field, a chunk index, "wrong key or tampered metadata"), never a key, a wrapped
key, an object name or a raw metadata value.
"""

from __future__ import annotations


class EnvelopeError(Exception):
    """The envelope cannot be used as asked: malformed or unsupported metadata, a bad
    argument (chunk size, length, range), or a Sealer fed more or fewer bytes than the
    length it promised."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class IntegrityError(EnvelopeError):
    """The object does not authenticate: the data key does not unwrap, or a chunk's tag
    fails, or chunks are missing, reordered or extra. Fail closed: nothing past the last
    verified chunk may be released."""
