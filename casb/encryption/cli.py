"""`casb envelope`: manage the keyring of proxy-side envelope encryption.

    casb envelope keygen --keyring FILE    write a new keyring (mode 0600), one fresh key
    casb envelope rotate --keyring FILE    add a fresh key and make it primary

Both print the (new) primary key id on stdout and exit 0; on a problem (the file exists
for keygen, is missing or invalid for rotate) they print the reason and exit 1. Old keys
stay in the keyring after a rotation: objects wrapped under them remain readable.
"""

from __future__ import annotations

import argparse
import sys

from casb.encryption.keyring import KeyringError, create_keyring_file, rotate_keyring_file

EXIT_OK, EXIT_FAILED = 0, 1


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``casb envelope keygen`` and ``casb envelope rotate``."""
    envelope = sub.add_parser(
        "envelope",
        help="manage the envelope-encryption keyring",
        description="Key-encryption keys of proxy-side envelope encryption.",
    )
    esub = envelope.add_subparsers(dest="envelope_command", required=True, metavar="SUBCOMMAND")

    p = esub.add_parser(
        "keygen",
        help="write a new keyring with one fresh key",
        description="Write a new keyring file (mode 0600) holding one fresh 256-bit key, "
        "its primary, and print the key id. Refuses to overwrite an existing file.",
    )
    p.add_argument("--keyring", required=True, metavar="FILE", help="the keyring file to create")
    p.set_defaults(func=cmd_keygen)

    p = esub.add_parser(
        "rotate",
        help="add a fresh key and make it primary",
        description="Add a fresh key to the keyring and make it primary (new objects are "
        "wrapped with it; the old keys stay, so existing objects stay readable). The file "
        "is replaced atomically, mode 0600. Prints the new primary key id.",
    )
    p.add_argument("--keyring", required=True, metavar="FILE", help="the keyring file to rotate")
    p.set_defaults(func=cmd_rotate)


def cmd_keygen(args: argparse.Namespace) -> int:
    try:
        kid = create_keyring_file(args.keyring)
    except KeyringError as exc:
        print(f"casb: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(kid)
    print(f"wrote {args.keyring} (mode 0600): keep it secret and backed up", file=sys.stderr)
    return EXIT_OK


def cmd_rotate(args: argparse.Namespace) -> int:
    try:
        kid = rotate_keyring_file(args.keyring)
    except KeyringError as exc:
        print(f"casb: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(kid)
    print(f"{args.keyring}: new primary key {kid}; the old keys are kept", file=sys.stderr)
    return EXIT_OK
