"""The uplink's messages to and from the wire: JSON control text, binary media.

Sans-IO and stateless: :func:`decode_control` and :func:`decode_media` check a
message field by field (types, sizes, ranges, unknown fields refused) before they
build its event; :func:`encode` is the inverse. Which side may send what, and
when, is :class:`agent.protocol.Uplink`'s business.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any, Final

from agent.messages import (
    FLAG_KEYFRAME,
    FLAG_PREROLL,
    MAX_AUDIT_LINES,
    MAX_CAMERAS,
    MAX_CHAIN_ENTRIES,
    MAX_CONTROL_BYTES,
    MAX_FPS,
    MAX_HOLDS,
    MAX_PAYLOAD_BYTES,
    MAX_SIDE,
    MEDIA_HEADER,
    VERSION,
    AccessHead,
    Ack,
    AuditAck,
    AuditEntries,
    CameraDesc,
    Chain,
    ChainAck,
    Challenge,
    Error,
    Event,
    Gap,
    Heartbeat,
    Hello,
    LocalProtocolError,
    Media,
    MediaKind,
    RemoteProtocolError,
    SessionClose,
    SessionOpen,
    Trigger,
    TriggerResult,
    Welcome,
    b64url,
    unb64url,
)

_HASH_HEX: Final = re.compile(r"[0-9a-f]{64}")
#: An age X25519 recipient: ``age1`` and 58 characters of bech32's alphabet.
_AGE_RECIPIENT: Final = re.compile(r"age1[02-9ac-hj-np-z]{58}")

# --- JSON field checking ----------------------------------------------------


def _expect(
    obj: Mapping[str, Any], where: str, fields: Mapping[str, type | tuple[type, ...]]
) -> None:
    unknown = set(obj) - set(fields) - {"type"}
    if unknown:
        raise RemoteProtocolError("malformed", f"{where}: unknown field(s) {sorted(unknown)}")
    for name, kind in fields.items():
        if name not in obj:
            raise RemoteProtocolError("malformed", f"{where}.{name}: missing")
        value = obj[name]
        # bool is an int in Python; never accept it where a number is meant.
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise RemoteProtocolError("malformed", f"{where}.{name}: wrong type")
        if not isinstance(value, kind):
            raise RemoteProtocolError("malformed", f"{where}.{name}: wrong type")


def _time(value: float, where: str) -> float:
    """A wall-clock time (Unix seconds): finite, 0 .. 2**40 (json takes NaN, and ints of
    any length, whose float() overflows)."""
    try:
        t = float(value)
    except OverflowError:
        raise RemoteProtocolError("malformed", f"{where}: out of range") from None
    if not (math.isfinite(t) and 0 <= t < 2**40):
        raise RemoteProtocolError("malformed", f"{where}: out of range")
    return t


def _text(value: str, where: str, limit: int = 256) -> str:
    if not value or len(value) > limit or not value.isprintable():
        raise RemoteProtocolError("malformed", f"{where}: empty, too long or unprintable")
    return value


def _seq(value: int, where: str) -> int:
    if not 0 <= value < 2**63:
        raise RemoteProtocolError("malformed", f"{where}: out of range")
    return value


def _camera_desc(obj: Any, where: str) -> CameraDesc:
    if not isinstance(obj, dict):
        raise RemoteProtocolError("malformed", f"{where}: expected an object")
    obj = {"end_seq": None, **obj}  # optional: absent while the session streams
    _expect(
        obj,
        where,
        {
            "index": int,
            "id": str,
            "zone": str,
            "codec": str,
            "width": int,
            "height": int,
            "fps": (int, float),
            "extradata": str,
            "first_seq": int,
            "live_seq": int,
            "end_seq": (int, type(None)),
        },
    )
    if obj["zone"] not in ("exterior", "interior"):
        raise RemoteProtocolError("malformed", f"{where}.zone: must be exterior or interior")
    if obj["codec"] not in ("h264", "mjpeg"):
        raise RemoteProtocolError("malformed", f"{where}.codec: unsupported")
    side, fps = (0 < obj["width"] <= MAX_SIDE and 0 < obj["height"] <= MAX_SIDE), obj["fps"]
    if not (side and 0 < fps <= MAX_FPS):
        raise RemoteProtocolError("malformed", f"{where}: width/height/fps out of range")
    if not obj["first_seq"] <= obj["live_seq"]:
        raise RemoteProtocolError("malformed", f"{where}: live_seq before first_seq")
    return CameraDesc(
        index=obj["index"],
        id=_text(obj["id"], f"{where}.id", 64),
        zone=obj["zone"],
        codec=obj["codec"],
        width=obj["width"],
        height=obj["height"],
        fps=float(obj["fps"]),
        extradata=unb64url(obj["extradata"], what=f"{where}.extradata"),
        first_seq=_seq(obj["first_seq"], f"{where}.first_seq"),
        live_seq=_seq(obj["live_seq"], f"{where}.live_seq"),
        end_seq=None if obj["end_seq"] is None else _seq(obj["end_seq"], f"{where}.end_seq"),
    )


def _holds(value: Any, acked: int) -> tuple[tuple[int, int], ...]:
    if not isinstance(value, list) or len(value) > MAX_HOLDS:
        raise RemoteProtocolError("malformed", f"ack.holds: a list of at most {MAX_HOLDS} ranges")
    holds: list[tuple[int, int]] = []
    floor = acked + 1
    for i, item in enumerate(value):
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in item)
        ):
            raise RemoteProtocolError("malformed", f"ack.holds[{i}]: expected [first, last]")
        first, last = _seq(item[0], f"ack.holds[{i}]"), _seq(item[1], f"ack.holds[{i}]")
        if not floor < first <= last:
            raise RemoteProtocolError("malformed", f"ack.holds[{i}]: not ascending above seq")
        holds.append((first, last))
        floor = last + 1
    return tuple(holds)


def _hex64(value: Any, where: str) -> str:
    if not isinstance(value, str) or len(value) != 64 or value.strip("0123456789abcdef"):
        raise RemoteProtocolError("malformed", f"{where}: expected 64 lowercase hex digits")
    return value


def _chain(obj: dict[str, Any]) -> Chain:
    fields = {
        "session": str,
        "camera": int,
        "first": int,
        "last": int,
        "prev": str,
        "head": str,
        "kid": str,
        "sig": str,
        "entries": list,
    }
    _expect(obj, "chain", fields)
    first, last = _seq(obj["first"], "chain.first"), _seq(obj["last"], "chain.last")
    entries = obj["entries"]
    if first > last or len(entries) != last - first + 1:
        raise RemoteProtocolError("malformed", "chain: entries must cover first..last exactly")
    if len(entries) > MAX_CHAIN_ENTRIES:
        raise RemoteProtocolError("malformed", f"chain: more than {MAX_CHAIN_ENTRIES} entries")
    kid = obj["kid"]
    if len(kid) != 16 or kid.strip("0123456789abcdef"):
        raise RemoteProtocolError("malformed", "chain.kid: expected 16 lowercase hex digits")
    if len(unb64url(obj["sig"], what="chain.sig")) != 64:
        raise RemoteProtocolError("malformed", "chain.sig: not an Ed25519 signature")
    parsed: list[tuple[int, int, str]] = []
    for i, item in enumerate(entries):
        if (
            not isinstance(item, list)
            or len(item) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in item[:2])
            or not -(2**63) <= item[0] < 2**63
            or item[1] not in (0, 1)
        ):
            raise RemoteProtocolError(
                "malformed", f"chain.entries[{i}]: expected [capture_us, flags, digest]"
            )
        parsed.append((item[0], item[1], _hex64(item[2], f"chain.entries[{i}]")))
    return Chain(
        _text(obj["session"], "chain.session", 64),
        obj["camera"],
        first,
        last,
        _hex64(obj["prev"], "chain.prev"),
        _hex64(obj["head"], "chain.head"),
        kid,
        obj["sig"],
        tuple(parsed),
    )


#: Recipients a welcome may name (a receiver with its identities of a key rotation).
MAX_WELCOME_RECIPIENTS = 8


def _recipients(value: Any, where: str) -> tuple[str, ...]:
    """Age X25519 recipients (``age1`` + 58 bech32 characters), at most a few."""
    if not isinstance(value, list) or len(value) > MAX_WELCOME_RECIPIENTS:
        raise RemoteProtocolError(
            "malformed", f"{where}: expected a list of up to {MAX_WELCOME_RECIPIENTS}"
        )
    for i, item in enumerate(value):
        if not (isinstance(item, str) and _AGE_RECIPIENT.fullmatch(item)):
            raise RemoteProtocolError("malformed", f"{where}[{i}]: not an age recipient")
    return tuple(value)


def decode_control(text: str) -> Event:
    """One control message (JSON text) as its event, checked field by field."""
    if len(text) > MAX_CONTROL_BYTES:
        raise RemoteProtocolError("too_large", f"control message over {MAX_CONTROL_BYTES} bytes")
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:  # ValueError: an int of over 4300 digits too
        raise RemoteProtocolError("malformed", f"control message is not JSON: {exc}") from exc
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise RemoteProtocolError("malformed", "control message needs a string 'type'")
    kind = obj["type"]
    if kind == "challenge":
        _expect(obj, kind, {"nonce": str})
        if len(unb64url(obj["nonce"], what="challenge.nonce")) < 16:
            raise RemoteProtocolError("malformed", "challenge.nonce: shorter than 128 bit")
        return Challenge(obj["nonce"])
    if kind == "hello":
        _expect(obj, kind, {"device": str, "sig": str, "enrollment": (dict, type(None))})
        return Hello(_text(obj["device"], "hello.device", 64), obj["sig"], obj["enrollment"])
    if kind == "welcome":
        recipients = _recipients(obj.pop("recipients", []), "welcome.recipients")
        _expect(obj, kind, {"acked": dict, "heartbeat_s": (int, float), "audit_n": int})
        acked: dict[str, dict[str, int]] = {}
        for sid, cams in obj["acked"].items():
            if not isinstance(cams, dict) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in cams.values()
            ):
                raise RemoteProtocolError(
                    "malformed", f"welcome.acked.{sid}: expected {{camera: seq}}"
                )
            acked[sid] = dict(cams)
        if not 0.1 <= obj["heartbeat_s"] <= 3600:
            raise RemoteProtocolError("malformed", "welcome.heartbeat_s: out of range")
        return Welcome(
            acked,
            float(obj["heartbeat_s"]),
            _seq(obj["audit_n"], "welcome.audit_n"),
            recipients,
        )
    if kind == "session_open":
        _expect(
            obj,
            kind,
            {
                "session": str,
                "building": str,
                "started_by": dict,
                "started_at": (int, float),
                "expires_at": (int, float),
                "cameras": list,
            },
        )
        if not 0 < len(obj["cameras"]) <= MAX_CAMERAS:
            raise RemoteProtocolError("malformed", f"session_open.cameras: 1..{MAX_CAMERAS} needed")
        cameras = tuple(
            _camera_desc(c, f"session_open.cameras[{i}]") for i, c in enumerate(obj["cameras"])
        )
        if [c.index for c in cameras] != list(range(len(cameras))):
            raise RemoteProtocolError("malformed", "session_open.cameras: index must be 0..n-1")
        return SessionOpen(
            _text(obj["session"], "session_open.session", 64),
            _text(obj["building"], "session_open.building", 64),
            obj["started_by"],
            _time(obj["started_at"], "session_open.started_at"),
            _time(obj["expires_at"], "session_open.expires_at"),
            cameras,
        )
    if kind == "ack":
        holds_json = obj.pop("holds", [])
        _expect(obj, kind, {"session": str, "camera": int, "seq": int})
        # -1: nothing durable yet from seq 0 on, but holds beyond it may be listed.
        seq = -1 if obj["seq"] == -1 else _seq(obj["seq"], "ack.seq")
        return Ack(obj["session"], obj["camera"], seq, _holds(holds_json, seq))
    if kind == "gap":
        fields = {"session": str, "camera": int, "first": int, "last": int, "reason": str}
        _expect(obj, kind, fields)
        first, last = _seq(obj["first"], "gap.first"), _seq(obj["last"], "gap.last")
        if first > last:
            raise RemoteProtocolError("malformed", "gap: first after last")
        if obj["reason"] not in ("lost", "evicted"):
            raise RemoteProtocolError("malformed", "gap.reason: must be lost or evicted")
        return Gap(obj["session"], obj["camera"], first, last, obj["reason"])
    if kind == "chain":
        return _chain(obj)
    if kind == "chain_ack":
        fields = {"session": str, "camera": int, "first": int, "last": int, "result": str}
        _expect(obj, kind, fields)
        first, last = _seq(obj["first"], "chain_ack.first"), _seq(obj["last"], "chain_ack.last")
        if first > last:
            raise RemoteProtocolError("malformed", "chain_ack: first after last")
        return ChainAck(
            obj["session"], obj["camera"], first, last, _text(obj["result"], "chain_ack.result", 64)
        )
    if kind == "session_close":
        _expect(obj, kind, {"session": str, "reason": str})
        return SessionClose(obj["session"], _text(obj["reason"], "session_close.reason"))
    if kind == "heartbeat":
        _expect(obj, kind, {"t": (int, float)})
        # The peer's word, judged by whoever reads it (the receiver ignores a reading that
        # is no time: receiver/device_clock.py), not a reason to cut the connection; an
        # int too long for a float (it raised OverflowError) reads as no time either.
        try:
            t = float(obj["t"])
        except OverflowError:
            t = math.inf
        return Heartbeat(t)
    if kind == "trigger":
        _expect(obj, kind, {"envelope": dict, "ref": str})
        return Trigger(obj["envelope"], _text(obj["ref"], "trigger.ref", 64))
    if kind == "trigger_result":
        _expect(obj, kind, {"ref": str, "status": int, "body": dict})
        if not 100 <= obj["status"] <= 599:
            raise RemoteProtocolError("malformed", "trigger_result.status: not an HTTP status")
        return TriggerResult(
            _text(obj["ref"], "trigger_result.ref", 64), obj["status"], obj["body"]
        )
    if kind == "audit":
        _expect(obj, kind, {"first": int, "lines": list})
        lines = obj["lines"]
        if not 0 < len(lines) <= MAX_AUDIT_LINES or not all(isinstance(x, str) for x in lines):
            raise RemoteProtocolError("malformed", f"audit.lines: 1..{MAX_AUDIT_LINES} strings")
        return AuditEntries(_seq(obj["first"], "audit.first"), tuple(lines))
    if kind == "audit_ack":
        _expect(obj, kind, {"n": int})
        return AuditAck(_seq(obj["n"], "audit_ack.n"))
    if kind == "access_head":
        _expect(obj, kind, {"n": int, "hash": str})
        if not _HASH_HEX.fullmatch(obj["hash"]):
            raise RemoteProtocolError("malformed", "access_head.hash: 64 lowercase hex digits")
        return AccessHead(_seq(obj["n"], "access_head.n"), obj["hash"])
    if kind == "error":
        _expect(obj, kind, {"code": str, "detail": str})
        return Error(_text(obj["code"], "error.code", 64), obj["detail"][:1024])
    raise RemoteProtocolError("malformed", f"unknown control message type {kind[:32]!r}")


def encode(event: Event) -> str | bytes:
    """One event as its message: JSON text, or the media header and payload."""
    if isinstance(event, Media):
        if len(event.payload) > MAX_PAYLOAD_BYTES:
            raise LocalProtocolError("too_large", f"media payload over {MAX_PAYLOAD_BYTES} bytes")
        flags = (FLAG_KEYFRAME if event.keyframe else 0) | (FLAG_PREROLL if event.preroll else 0)
        header = MEDIA_HEADER.pack(
            VERSION,
            event.kind,
            event.camera,
            event.seq,
            event.capture_us,
            flags,
            len(event.payload),
        )
        return header + event.payload
    body: dict[str, Any]
    if isinstance(event, Challenge):
        body = {"type": "challenge", "nonce": event.nonce}
    elif isinstance(event, Hello):
        body = {"type": "hello", "device": event.device, "sig": event.sig}
        body["enrollment"] = dict(event.enrollment) if event.enrollment is not None else None
    elif isinstance(event, Welcome):
        acked = {s: dict(c) for s, c in event.acked.items()}
        body = {
            "type": "welcome",
            "acked": acked,
            "heartbeat_s": event.heartbeat_s,
            "audit_n": event.audit_n,
        }
        if event.recipients:  # only then: an agent from before the field refuses it
            body["recipients"] = list(event.recipients)
    elif isinstance(event, SessionOpen):
        body = {
            "type": "session_open",
            "session": event.session,
            "building": event.building,
            "started_by": dict(event.started_by),
            "started_at": event.started_at,
            "expires_at": event.expires_at,
            "cameras": [
                {
                    "index": c.index,
                    "id": c.id,
                    "zone": c.zone,
                    "codec": c.codec,
                    "width": c.width,
                    "height": c.height,
                    "fps": c.fps,
                    "extradata": b64url(c.extradata),
                    "first_seq": c.first_seq,
                    "live_seq": c.live_seq,
                    "end_seq": c.end_seq,
                }
                for c in event.cameras
            ],
        }
    elif isinstance(event, Ack):
        body = {"type": "ack", "session": event.session, "camera": event.camera, "seq": event.seq}
        if event.holds:
            body["holds"] = [list(h) for h in event.holds]
    elif isinstance(event, Gap):
        body = {
            "type": "gap",
            "session": event.session,
            "camera": event.camera,
            "first": event.first,
            "last": event.last,
            "reason": event.reason,
        }
    elif isinstance(event, Chain):
        body = {
            "type": "chain",
            "session": event.session,
            "camera": event.camera,
            "first": event.first,
            "last": event.last,
            "prev": event.prev,
            "head": event.head,
            "kid": event.kid,
            "sig": event.sig,
            "entries": [list(e) for e in event.entries],
        }
    elif isinstance(event, ChainAck):
        body = {
            "type": "chain_ack",
            "session": event.session,
            "camera": event.camera,
            "first": event.first,
            "last": event.last,
            "result": event.result,
        }
    elif isinstance(event, SessionClose):
        body = {"type": "session_close", "session": event.session, "reason": event.reason}
    elif isinstance(event, Heartbeat):
        body = {"type": "heartbeat", "t": event.t}
    elif isinstance(event, Trigger):
        body = {"type": "trigger", "envelope": dict(event.envelope), "ref": event.ref}
    elif isinstance(event, TriggerResult):
        body = {
            "type": "trigger_result",
            "ref": event.ref,
            "status": event.status,
            "body": dict(event.body),
        }
    elif isinstance(event, AuditEntries):
        body = {"type": "audit", "first": event.first, "lines": list(event.lines)}
    elif isinstance(event, AuditAck):
        body = {"type": "audit_ack", "n": event.n}
    elif isinstance(event, AccessHead):
        body = {"type": "access_head", "n": event.n, "hash": event.hash}
    else:
        body = {"type": "error", "code": event.code, "detail": event.detail}
    text = json.dumps(body, separators=(",", ":"))
    if len(text) > MAX_CONTROL_BYTES:
        raise LocalProtocolError("too_large", f"{body['type']} over {MAX_CONTROL_BYTES} bytes")
    return text


def encode_control(event: Event) -> str:
    """One control event as its JSON text (also how the agent persists a session_open)."""
    if isinstance(event, Media):
        raise LocalProtocolError("unexpected", "media is binary")
    wire = encode(event)
    assert isinstance(wire, str)
    return wire


_MEDIA_KINDS = {kind.value: kind for kind in MediaKind}


def decode_media(data: bytes) -> Media:
    """One binary message as its ``Media`` event, its header checked."""
    if len(data) < MEDIA_HEADER.size:
        raise RemoteProtocolError("malformed", "media message shorter than its header")
    version, kind, camera, seq, capture_us, flags, length = MEDIA_HEADER.unpack_from(data)
    if version != VERSION:
        raise RemoteProtocolError(
            "bad_version", f"media header version {version}, expected {VERSION}"
        )
    media_kind = _MEDIA_KINDS.get(kind)
    if media_kind is None:
        raise RemoteProtocolError("malformed", f"media kind {kind} unknown")
    if flags & ~(FLAG_KEYFRAME | FLAG_PREROLL):
        raise RemoteProtocolError("malformed", f"media flags {flags:#x} has unknown bits")
    if length > MAX_PAYLOAD_BYTES:
        raise RemoteProtocolError("too_large", f"media payload over {MAX_PAYLOAD_BYTES} bytes")
    if length != len(data) - MEDIA_HEADER.size:
        raise RemoteProtocolError("malformed", "media payload length does not match the message")
    return Media(
        media_kind,
        camera,
        _seq(seq, "media.seq"),
        capture_us,
        bool(flags & FLAG_KEYFRAME),
        bool(flags & FLAG_PREROLL),
        data[MEDIA_HEADER.size :],
    )
