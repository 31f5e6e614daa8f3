"""``breakglass trigger sign|send|challenge`` and ``breakglass trust keylist``.

- ``trigger sign`` prints a signed trigger envelope (DESIGN.md "Signed
  documents") on one line; nothing is sent.
- ``trigger send`` POSTs an envelope to an agent's local API
  (``https://AGENT:PORT/v1/triggers``); ``trigger challenge`` fetches a device
  nonce (``GET /v1/challenge``) for a signer whose clock is not synchronised.
  Both pin the agent's self-signed certificate by its SHA-256 (``--pin``, from
  the mDNS TXT record ``fp`` or ``provision pair --out``) and refuse to run without a
  pin: there is no trust on first use.
- ``trust keylist`` signs the district's trigger-key list with the district
  authority key.

Exit codes: 0 done (the agent accepted the trigger); 1 a document or an answer
was refused (printed as ``breakglass: error: CODE: detail``); 2 bad arguments,
an unusable key file, or the agent could not be reached (or presented another
certificate than the pinned one: then nothing was sent).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from provisioning import documents as d
from provisioning import triggers as t
from provisioning.documents import DocumentError
from provisioning.keys import kid, load_private_key, load_public_key, raw_public

__all__ = ["add_parser"]

TIMEOUT_S: Final = 10.0
MAX_ANSWER_BYTES: Final = 64 * 1024
MAX_VALID_DAYS: Final = 3650


def _error(message: str, code: int) -> int:
    print(f"breakglass: error: {message}", file=sys.stderr)
    return code


def _clean(text: object, limit: int = 300) -> str:
    """Text from the network made safe for a terminal: printable, bounded."""
    out = "".join(c if c.isprintable() else "?" for c in str(text))
    return out if len(out) <= limit else out[:limit] + "..."


# -- argument types (an ArgumentTypeError becomes "argument --NAME: message") ------------


def _id(text: str, what: str) -> str:
    if not t.ID_RE.match(text):
        raise argparse.ArgumentTypeError(
            f"{text!r}: a {what} id is 1-32 characters a-z 0-9 _ -, starting with a-z or 0-9"
        )
    return text


def _building(text: str) -> str:
    return _id(text, "building")


def _device(text: str) -> str:
    return _id(text, "device")


def _cameras(text: str) -> str | list[str]:
    if text == "all":
        return "all"
    ids = [_id(c.strip(), "camera") for c in text.split(",")]
    if len(set(ids)) != len(ids):
        raise argparse.ArgumentTypeError(f"{text!r}: a camera is listed twice")
    if len(ids) > 64:
        raise argparse.ArgumentTypeError(f"{text!r}: at most 64 cameras")
    return ids


def _reason(text: str) -> str:
    if not 0 < len(text) <= 500 or not text.isprintable():
        raise argparse.ArgumentTypeError("1-500 printable characters (no newlines)")
    return text


def _challenge(text: str) -> str:
    try:
        if not t.NONCE_RE.match(text):
            raise DocumentError("malformed", "not 16-64 bytes of base64url")
        d.b64url_decode(text, what="challenge")
    except DocumentError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc.detail}") from None
    return text


def _session(text: str) -> str:
    if not t.SESSION_RE.match(text):
        raise argparse.ArgumentTypeError(
            f"{text[:70]!r}: not a session id (as in 20261128T133000Z-3f9a1c2e)"
        )
    return text


def _bounded_int(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not in {low}..{high}")
        return value

    return parse


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """One ``--key PUB.pem:ROLE:BUILDINGS:LABEL`` of ``trust keylist``."""

    path: Path
    kid: str
    raw: bytes
    role: str
    buildings: str | list[str]
    label: str

    def payload(self) -> dict[str, Any]:
        """The entry as the trigger-key list carries it."""
        return {
            "key": d.b64url(self.raw),
            "role": self.role,
            "buildings": self.buildings,
            "label": self.label,
        }


def _key_entry(text: str) -> KeyEntry:
    parts = text.split(":", 3)
    if len(parts) != 4 or not all(parts):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected PUB.pem:ROLE:BUILDINGS:LABEL "
            "(e.g. dispatch.pub:dispatch:all:County 911 dispatch)"
        )
    path, role, buildings, label = parts
    if role not in t.ROLES:
        raise argparse.ArgumentTypeError(
            f"{text!r}: role {role!r} is not one of {'|'.join(t.ROLES)}"
        )
    scope: str | list[str] = "all"
    if buildings != "all":
        try:
            scope = [_building(b.strip()) for b in buildings.split(",")]
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
        if len(set(scope)) != len(scope):
            raise argparse.ArgumentTypeError(f"{text!r}: a building is listed twice")
    if len(label) > 120 or not label.isprintable():
        raise argparse.ArgumentTypeError(f"{text!r}: the label is 1-120 printable characters")
    try:
        public = load_public_key(Path(path))
    except ValueError as exc:  # KeyFileError
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    return KeyEntry(Path(path), kid(public), raw_public(public), role, scope, label)


# -- trigger sign ------------------------------------------------------------------------


def _trigger_sign(args: argparse.Namespace) -> int:
    if args.session is not None and args.trigger_action == "start":
        return _error("--session: only an extend or an end names a session", 2)
    key = load_private_key(args.key)
    try:
        envelope = t.sign_trigger(
            key,
            action=args.trigger_action,  # `args.action` is the subcommand
            building=args.building,
            reason=args.reason,
            now=int(time.time()),
            cameras=args.cameras,
            lifetime_s=args.lifetime,
            challenge=args.challenge,
            session=args.session,
            device=args.device,
        )
    except DocumentError as exc:
        return _error(f"{exc.code}: {exc.detail}", 1)
    print(json.dumps(envelope, separators=(",", ":")))
    return 0


# -- trigger send / challenge ------------------------------------------------------------


class Unreachable(Exception):
    """The agent could not be reached, or is not the pinned one (nothing was sent)."""


@dataclass(frozen=True, slots=True)
class Answer:
    """An HTTP answer of the agent: status and the body parsed as JSON (None if not JSON)."""

    status: int
    doc: Any
    size: int


def _base_url(to: str) -> str:
    """``https://host:port`` from ``--to``; ValueError for anything else."""
    parts = urlsplit(to)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f"--to {to!r}: expected https://AGENT:PORT")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError(f"--to {to!r}: expected https://AGENT:PORT (no credentials or query)")
    if parts.path not in ("", "/"):
        raise ValueError(f"--to {to!r}: give the agent's address only, without a path")
    try:
        parts.port  # noqa: B018  (raises ValueError for a bad port)
    except ValueError as exc:
        raise ValueError(f"--to {to!r}: {exc}") from None
    return f"https://{parts.netloc}"


async def _exchange(method: str, url: str, pin: str, body: bytes | None) -> Answer:
    """One request to the agent over TLS pinned to ``pin``; the answer's body size-capped."""
    import aiohttp

    from provisioning.tls import fingerprint_digest

    ssl = aiohttp.Fingerprint(fingerprint_digest(pin))  # no CA check: self-signed, pinned
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    headers = {"Accept": "application/json"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as http,
            http.request(
                method, url, data=body, headers=headers, ssl=ssl, allow_redirects=False
            ) as resp,
        ):
            length = resp.content_length
            if length is not None and length > MAX_ANSWER_BYTES:
                return Answer(resp.status, None, length)
            data = bytearray()
            async for chunk in resp.content.iter_any():
                data += chunk
                if len(data) > MAX_ANSWER_BYTES:
                    return Answer(resp.status, None, len(data))
            try:
                doc = json.loads(bytes(data))
            except (ValueError, RecursionError):
                doc = None
            return Answer(resp.status, doc, len(data))
    except aiohttp.ServerFingerprintMismatch as exc:
        raise Unreachable(
            f"{url}: the agent presented certificate sha256:{exc.got.hex()}, "
            f"not the pinned {pin}; nothing was sent"
        ) from None
    except TimeoutError:
        raise Unreachable(f"{url}: no answer within {TIMEOUT_S:.0f} s") from None
    except aiohttp.ClientConnectorError as exc:
        err = exc.os_error
        reason = os.strerror(err.errno) if err.errno else str(err)
        raise Unreachable(f"cannot reach the agent at {url}: {_clean(reason)}") from None
    except aiohttp.ClientError as exc:
        raise Unreachable(f"cannot reach the agent at {url}: {_clean(exc)}") from None


def _checked_pin(pin: str) -> str:
    from provisioning.tls import fingerprint_digest

    try:
        fingerprint_digest(pin)
    except ValueError as exc:
        raise ValueError(f"--pin {pin!r}: {exc}") from None
    return pin


def _read_envelope(path: Path | None) -> bytes:
    limit = d.envelope_limit(d.MAX_PAYLOAD_BYTES)
    if path is None:
        return sys.stdin.buffer.read(limit + 1)
    try:
        with path.open("rb") as fh:
            return fh.read(limit + 1)
    except OSError as exc:
        raise ValueError(f"--file {path}: cannot read ({exc.strerror})") from None


def _print_answer(answer: Answer) -> None:
    if answer.doc is not None:
        print(json.dumps(answer.doc))  # re-serialised: no control characters reach the terminal


def _refused(answer: Answer, url: str) -> int:
    """Exit 1 with the agent's error code and detail (or what was wrong with its answer)."""
    doc = answer.doc
    if isinstance(doc, dict) and "error" in doc:
        return _error(f"{_clean(doc['error'], 40)}: {_clean(doc.get('detail', ''))}", 1)
    if answer.size > MAX_ANSWER_BYTES:
        what = f"an answer larger than {MAX_ANSWER_BYTES} bytes"
    else:
        what = "no JSON error" if doc is None else "an unexpected answer"
    return _error(f"the agent at {url} answered HTTP {answer.status} with {what}", 1)


def _trigger_send(args: argparse.Namespace) -> int:
    try:
        pin = _checked_pin(args.pin)
        url = _base_url(args.to) + "/v1/triggers"
        raw = _read_envelope(args.file)
    except ValueError as exc:
        return _error(str(exc), 2)
    try:
        d.parse_envelope(raw)  # the same size and shape rules the agent applies first
    except DocumentError as exc:
        return _error(f"{exc.code}: {exc.detail} (not sent)", 1)
    try:
        answer = asyncio.run(_exchange("POST", url, pin, raw.strip()))
    except Unreachable as exc:
        return _error(str(exc), 2)
    _print_answer(answer)
    if 200 <= answer.status < 300:
        return 0
    return _refused(answer, url)


def _trigger_challenge(args: argparse.Namespace) -> int:
    try:
        pin = _checked_pin(args.pin)
        url = _base_url(args.to) + "/v1/challenge"
    except ValueError as exc:
        return _error(str(exc), 2)
    try:
        answer = asyncio.run(_exchange("GET", url, pin, None))
    except Unreachable as exc:
        return _error(str(exc), 2)
    if answer.status != 200:
        _print_answer(answer)
        return _refused(answer, url)
    challenge = answer.doc.get("challenge") if isinstance(answer.doc, dict) else None
    if not isinstance(challenge, str) or not t.NONCE_RE.match(challenge):
        return _error(f"the agent at {url} answered without a usable challenge", 1)
    print(challenge)
    return 0


# -- trust keylist -----------------------------------------------------------------------


def _trust_keylist(args: argparse.Namespace) -> int:
    entries: list[KeyEntry] = args.keys
    seen: dict[str, KeyEntry] = {}
    for entry in entries:
        if entry.kid in seen:
            return _error(
                f"--key {entry.path} and --key {seen[entry.kid].path} are the same public key "
                f"(kid {entry.kid})",
                2,
            )
        seen[entry.kid] = entry
    authority = load_private_key(args.authority)
    now = int(time.time())
    exp = now + args.valid_days * 86400
    try:
        envelope = t.sign_key_list(
            authority, args.version, [e.payload() for e in entries], iat=now, exp=exp
        )
        # What an agent will do with it: a list it would refuse is never written.
        t.parse_key_list(envelope, authority.public_key())
    except DocumentError as exc:
        return _error(f"{exc.code}: {exc.detail}", 1)
    out: Path = args.out
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(envelope, separators=(",", ":")) + "\n")
        tmp.replace(out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        return _error(f"--out {out}: cannot write ({exc.strerror})", 2)
    until = datetime.fromtimestamp(exp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    print(
        f"trigger-key list v{args.version} ({len(entries)} key(s), valid until {until}) "
        f"signed by authority kid {kid(authority.public_key())}: {out}"
    )
    return 0


# -- the parser --------------------------------------------------------------------------


def _agent_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--to", required=True, metavar="https://AGENT:PORT", help="the agent's local API"
    )
    parser.add_argument(
        "--pin",
        required=True,
        metavar="sha256:HEX",
        help="SHA-256 of the agent's certificate (mDNS `fp`, `provision pair --out`): "
        "there is no trust on first use",
    )


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``trigger sign|send|challenge`` and ``trust keylist`` to the top-level subcommands.

    The chosen command's handler is ``args.func(args) -> int`` (an exit code).
    """
    trigger = sub.add_parser(
        "trigger", help="signed remote triggers (dispatch, principal, superintendent)"
    ).add_subparsers(dest="action", required=True)

    sign = trigger.add_parser(
        "sign",
        help="sign a trigger and print its envelope (JSON, one line)",
        description="Sign a trigger with an Ed25519 trigger key and print the envelope. "
        "Nothing is sent: pipe it to `breakglass trigger send`.",
    )
    sign.add_argument("--key", type=Path, required=True, metavar="KEY.pem", help="mode 0600")
    sign.add_argument("--action", dest="trigger_action", required=True, choices=t.ACTIONS)
    sign.add_argument("--building", required=True, type=_building, metavar="B")
    sign.add_argument(
        "--cameras", type=_cameras, default="all", metavar="all|a,b,c", help="default: all"
    )
    sign.add_argument("--reason", required=True, type=_reason, metavar="TEXT")
    sign.add_argument(
        "--challenge",
        type=_challenge,
        metavar="N",
        help="a challenge from `breakglass trigger challenge` (for an unsynchronised clock)",
    )
    sign.add_argument(
        "--session",
        type=_session,
        metavar="ID",
        help="extend or end only this session (the agent's status names the open one; "
        "it refuses the trigger, no_session, once another is open)",
    )
    sign.add_argument(
        "--device",
        type=_device,
        metavar="ID",
        help="for this device only (the building's other devices refuse it)",
    )
    sign.add_argument(
        "--lifetime",
        type=_bounded_int(1, t.MAX_LIFETIME_S),
        default=120,
        metavar="S",
        help=f"seconds the trigger is valid (default 120, at most {t.MAX_LIFETIME_S})",
    )
    sign.set_defaults(func=_trigger_sign)

    send = trigger.add_parser(
        "send",
        help="send a trigger envelope to an agent (HTTPS, pinned certificate)",
        description="POST a trigger envelope to AGENT/v1/triggers. Exit 0 when the agent "
        "accepted it, 1 when it refused it (its error code is printed), 2 when it "
        "could not be reached.",
    )
    _agent_arguments(send)
    send.add_argument("--file", type=Path, metavar="F", help="the envelope (default: stdin)")
    send.set_defaults(func=_trigger_send)

    challenge = trigger.add_parser(
        "challenge",
        help="print a fresh device challenge (sign with --challenge when clocks disagree)",
    )
    _agent_arguments(challenge)
    challenge.set_defaults(func=_trigger_challenge)

    trust = sub.add_parser("trust", help="the district's trust documents").add_subparsers(
        dest="action", required=True
    )
    keylist = trust.add_parser(
        "keylist",
        help="sign the trigger-key list (which keys may trigger which buildings)",
        description="Sign a trigger-key list with the district authority key. Publishing "
        "version N+1 without a key revokes it; agents refuse lower versions and, once "
        "it expires, every remote trigger (never the panic button).",
    )
    keylist.add_argument(
        "--authority", type=Path, required=True, metavar="AUTH.pem", help="mode 0600"
    )
    keylist.add_argument(
        "--version", type=_bounded_int(1, 2**40), required=True, metavar="N", help="> the last"
    )
    keylist.add_argument(
        "--valid-days", type=_bounded_int(1, MAX_VALID_DAYS), required=True, metavar="D"
    )
    keylist.add_argument(
        "--key",
        dest="keys",
        type=_key_entry,
        action="append",
        required=True,
        metavar="PUB.pem:ROLE:BUILDINGS:LABEL",
        help=f"ROLE: {'|'.join(t.ROLES)}; BUILDINGS: all or b1,b2; repeat per key",
    )
    keylist.add_argument("--out", type=Path, required=True, metavar="FILE")
    keylist.set_defaults(func=_trust_keylist)
