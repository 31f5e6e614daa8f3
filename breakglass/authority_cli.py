"""The district authority's commands: ``breakglass provision authority|certify|revoke``.

- ``authority init --out DIR``: the district's Ed25519 authority key
  (``DIR/authority.key``, 0600, kept offline) and ``DIR/authority.pub`` (give it
  to every receiver as ``DATA/authority.pub`` and to every agent's ``[trust]``).
- ``certify``: sign a device's enrollment certificate (what a receiver checks at
  every hello): device id and public key, building, receiver URL and pin, age
  recipients, retention and camera zones; ``--version`` higher than the last to
  re-enroll.
- ``revoke``: sign a revocation list of devices no receiver may accept.

Exit codes: 0 written; 1 refused (a document would not verify); 2 bad
arguments or unreadable key files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from provisioning.documents import KID_RE, DocumentError
from provisioning.enrollment import (
    ID_RE,
    parse_enrollment,
    parse_revocations,
    sign_enrollment,
    sign_revocations,
)
from provisioning.errors import ProvisioningError
from provisioning.keys import kid, load_private_key, load_public_key, new_private_key, public_pem

MAX_VALID_DAYS = 3650


def _write(path: Path, doc: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc) + "\n")
    os.replace(tmp, path)


def _init(args: argparse.Namespace) -> int:
    key_path, pub_path = args.out / "authority.key", args.out / "authority.pub"
    if key_path.exists():
        print(f"breakglass: error: {key_path} exists; an authority is made once", file=sys.stderr)
        return 2
    key = new_private_key(key_path)
    pub_path.write_bytes(public_pem(key.public_key()))
    print(f"district authority {kid(key.public_key())}: {key_path} (keep offline), {pub_path}")
    return 0


def _camera(text: str) -> dict[str, str]:
    cid, _, zone = text.partition("=")
    if not ID_RE.match(cid) or zone not in ("exterior", "interior"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected ID=exterior or ID=interior")
    return {"id": cid, "zone": zone}


def _certify(args: argparse.Namespace) -> int:
    authority = load_private_key(args.authority)
    now = int(time.time())
    cert = sign_enrollment(
        authority,
        version=args.version,
        device=args.device,
        device_key=load_public_key(args.device_key),
        building=args.building,
        receiver_url=args.receiver_url,
        receiver_pin=args.receiver_pin,
        recipients=args.recipient,
        cameras=args.camera,
        retention_h=args.retention_h,
        iat=now,
        exp=now + args.valid_days * 86400,
    )
    parse_enrollment(cert, authority.public_key(), now=now)  # what receivers will check
    _write(args.out, cert)
    print(f"enrollment v{args.version} of {args.device} ({args.building}) written to {args.out}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    authority = load_private_key(args.authority)
    revoked = []
    for text in args.devices:
        device, colon, key_id = text.partition(":")
        if not ID_RE.fullmatch(device) or (colon and not KID_RE.fullmatch(key_id)):
            print(
                f"breakglass: error: device {text!r}: expected ID or ID:KID "
                "(KID: the key id, 16 lowercase hex digits)",
                file=sys.stderr,
            )
            return 2
        revoked.append({"device": device, "kid": key_id} if colon else {"device": device})
    now = int(time.time())
    doc = sign_revocations(authority, args.version, revoked, iat=now, exp=now + 365 * 86400)
    parse_revocations(doc, authority.public_key())
    _write(args.out, doc)
    print(f"revocation list v{args.version} ({len(revoked)} devices) written to {args.out}")
    return 0


def _guarded(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except DocumentError as exc:
            print(f"breakglass: error: {exc.code}: {exc.detail}", file=sys.stderr)
            return 1
        except ProvisioningError as exc:
            print(f"breakglass: error: {exc}", file=sys.stderr)
            return 2

    return run


def add_commands(provision: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``authority init``, ``certify`` and ``revoke`` under ``provision``."""
    authority = provision.add_parser("authority", help="the district's authority key")
    init = authority.add_subparsers(dest="authority_action", required=True).add_parser(
        "init", help="make the district authority key pair (once)"
    )
    init.add_argument("--out", type=Path, required=True, metavar="DIR")
    init.set_defaults(func=_guarded(_init))

    certify = provision.add_parser("certify", help="sign a device's enrollment certificate")
    certify.add_argument("--authority", type=Path, required=True, metavar="KEY")
    certify.add_argument("--device", required=True, metavar="ID")
    certify.add_argument("--device-key", type=Path, required=True, metavar="PUB.pem")
    certify.add_argument("--building", required=True, metavar="ID")
    certify.add_argument("--receiver-url", required=True, metavar="wss://HOST:PORT/v1/uplink")
    certify.add_argument("--receiver-pin", required=True, metavar="sha256:HEX")
    certify.add_argument("--recipient", action="append", required=True, metavar="age1...")
    certify.add_argument("--camera", action="append", type=_camera, default=[], metavar="ID=ZONE")
    certify.add_argument("--retention-h", type=float, default=72.0)
    certify.add_argument("--version", type=int, default=1)
    certify.add_argument(
        "--valid-days", type=int, default=365, choices=range(1, MAX_VALID_DAYS + 1), metavar="D"
    )
    certify.add_argument("--out", type=Path, required=True, metavar="FILE")
    certify.set_defaults(func=_guarded(_certify))

    revoke = provision.add_parser(
        "revoke",
        help="sign a revocation list",
        description="Sign a revocation list naming every device no receiver may accept any "
        "more (a list replaces the one before: name them all). DEVICE is a device id (every "
        "key it had), or ID:KID to name its key too (that key is refused under any id).",
    )
    revoke.add_argument("devices", nargs="+", metavar="DEVICE[:KID]")
    revoke.add_argument("--authority", type=Path, required=True, metavar="KEY")
    revoke.add_argument("--version", type=int, required=True)
    revoke.add_argument("--out", type=Path, required=True, metavar="FILE")
    revoke.set_defaults(func=_guarded(_revoke))
