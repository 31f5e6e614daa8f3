"""The uplink protocol, both ends wired together in memory (h11's ConnectionPair style)."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import protocol as p
from agent.wire import decode_control, encode_control

NONCE = p.b64url(bytes(range(32)))


class Pair:
    """An agent end and a receiver end; ``send`` delivers to the other side."""

    def __init__(self) -> None:
        self.agent = p.Uplink(p.Role.AGENT)
        self.receiver = p.Uplink(p.Role.RECEIVER)

    def send(self, sender: p.Uplink, event: p.Event) -> p.Event:
        other = self.receiver if sender is self.agent else self.agent
        received = other.receive(sender.send(event))
        assert received == event
        return received

    def handshake(self) -> None:
        self.send(self.receiver, p.Challenge(NONCE))
        self.send(self.agent, p.Hello("dev-1", p.b64url(b"s" * 64), None))
        self.send(self.receiver, p.Welcome({"s1": {"cam": 4}}, 5.0))


def open_event(cameras: int = 2) -> p.SessionOpen:
    return p.SessionOpen(
        "s1",
        "bldg",
        {"kind": "button", "button_id": "office", "location": "Main office"},
        1.0,
        3601.0,
        tuple(
            p.CameraDesc(i, f"cam{i}", "interior", "h264", 640, 480, 15.0, b"\0\0\0\1gB", 10, 40)
            for i in range(cameras)
        ),
    )


def test_full_session_round_trip() -> None:
    pair = Pair()
    pair.handshake()
    assert pair.agent.phase is p.Phase.READY and pair.receiver.phase is p.Phase.READY
    pair.send(pair.agent, open_event())
    media = p.Media(p.MediaKind.LIVE, 1, 2**40, -5, True, True, b"\0\0\0\1e" + bytes(1000))
    pair.send(pair.agent, media)
    pair.send(pair.receiver, p.Ack("s1", 1, 2**40))
    pair.send(pair.agent, p.Heartbeat(12.5))
    pair.send(pair.receiver, p.Trigger({"payload": "x", "kid": "k", "sig": "s"}, "t-1"))
    pair.send(pair.agent, p.TriggerResult("t-1", 403, {"error": "bad_signature"}))
    pair.send(pair.agent, p.AuditEntries(1, ('{"n":1}', '{"n":2}')))
    pair.send(pair.receiver, p.AuditAck(2))
    pair.send(pair.agent, p.SessionClose("s1", "expired"))
    assert pair.agent.session is None and pair.receiver.session is None


def test_media_header_layout_is_the_documented_one() -> None:
    wire = p.Uplink(p.Role.AGENT)
    wire.phase, wire.session, wire.camera_count = p.Phase.READY, "s", 4
    data = wire.send(p.Media(p.MediaKind.LIVE, 3, 7, 123, True, False, b"abc"))
    assert isinstance(data, bytes)
    assert data[:25] == bytes([1, 0, 3, 0]) + (7).to_bytes(8, "little") + (123).to_bytes(
        8, "little"
    ) + bytes([1]) + (3).to_bytes(4, "little")
    assert data[25:] == b"abc"


OPEN = encode_control(
    p.SessionOpen(
        "s1",
        "b",
        {},
        1.0,
        2.0,
        (p.CameraDesc(0, "cam", "interior", "h264", 160, 120, 30.0, b"", 0, 0),),
    )
)


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("not json", "malformed"),
        ('{"type":"hello"}', "malformed"),
        ('{"type":"hello","device":"d","sig":"x","enrollment":null,"extra":1}', "malformed"),
        ('{"type":"nope"}', "malformed"),
        ("[1,2]", "malformed"),
        ('{"type":"hello","device":"","sig":"x","enrollment":null}', "malformed"),
        ('{"type":"hello","device":true,"sig":"x","enrollment":null}', "malformed"),
        ("x" * (p.MAX_CONTROL_BYTES + 1), "too_large"),
        # An integer of over 4300 digits: Python refuses to parse it with a ValueError
        # that is not a JSONDecodeError; it ended the agent's uplink for good.
        ('{"type":"heartbeat","t":1' + "0" * 4400 + "}", "malformed"),
        # Times of a session that are no times (float() of a long int overflowed: a
        # traceback, the uplink cut; NaN reached session.json, which no browser parses).
        (OPEN.replace('"started_at":1.0', '"started_at":1' + "0" * 400), "malformed"),
        (OPEN.replace('"expires_at":2.0', '"expires_at":NaN'), "malformed"),
        (OPEN.replace('"expires_at":2.0', '"expires_at":-1'), "malformed"),
    ],
)
def test_bad_control_messages_are_refused_with_a_code(message: str, code: str) -> None:
    receiver = p.Uplink(p.Role.RECEIVER)
    receiver.send(p.Challenge(NONCE))
    with pytest.raises(p.RemoteProtocolError) as info:
        receiver.receive(message)
    assert info.value.code == code


def test_order_is_enforced() -> None:
    pair = Pair()
    with pytest.raises(p.LocalProtocolError):
        pair.agent.send(open_event())  # before the handshake
    pair.handshake()
    with pytest.raises(p.RemoteProtocolError) as info:
        pair.receiver.receive(p.MEDIA_HEADER.pack(1, 0, 0, 1, 1, 1, 0))  # media before session_open
    assert info.value.code == "no_session"
    pair.send(pair.agent, open_event(cameras=1))
    with pytest.raises(p.RemoteProtocolError) as info:
        pair.receiver.receive(p.MEDIA_HEADER.pack(1, 0, 1, 1, 1, 1, 0))
    assert info.value.code == "unknown_camera"
    with pytest.raises(p.LocalProtocolError):
        pair.agent.send(p.Ack("s1", 0, 1))  # wrong side


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (p.MEDIA_HEADER.pack(2, 0, 0, 1, 1, 1, 0), "bad_version"),
        (p.MEDIA_HEADER.pack(1, 9, 0, 1, 1, 1, 0), "malformed"),
        (p.MEDIA_HEADER.pack(1, 0, 0, 1, 1, 0x80, 0), "malformed"),
        (p.MEDIA_HEADER.pack(1, 0, 0, 1, 1, 1, 5), "malformed"),
        (p.MEDIA_HEADER.pack(1, 0, 0, 1, 1, 1, p.MAX_PAYLOAD_BYTES + 1), "too_large"),
        (b"\x01\x00", "malformed"),
    ],
)
def test_bad_media_headers(header: bytes, code: str) -> None:
    pair = Pair()
    pair.handshake()
    pair.send(pair.agent, open_event(cameras=1))
    with pytest.raises(p.RemoteProtocolError) as info:
        pair.receiver.receive(header)
    assert info.value.code == code


def test_hello_signed_bytes_bind_nonce_and_origin() -> None:
    assert p.hello_signed_bytes(NONCE, "wss://a:1") == bytes(range(32)) + b"wss://a:1"
    assert p.hello_signed_bytes(NONCE, "wss://a:1") != p.hello_signed_bytes(NONCE, "wss://b:1")


@given(st.binary(max_size=200))
def test_garbage_binary_never_escapes_as_another_exception(data: bytes) -> None:
    pair = Pair()
    pair.handshake()
    pair.send(pair.agent, open_event())
    with contextlib.suppress(p.RemoteProtocolError):
        pair.receiver.receive(data)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
        max_leaves=12,
    )
)
def test_garbage_json_never_escapes_as_another_exception(doc: object) -> None:
    receiver = p.Uplink(p.Role.RECEIVER)
    receiver.send(p.Challenge(NONCE))
    with contextlib.suppress(p.RemoteProtocolError):
        receiver.receive(json.dumps(doc))


# -- the footage hash chain: chain (agent -> receiver) and chain_ack ------------------------


def chain_event(first: int = 10, count: int = 3, camera: int = 1, session: str = "s1") -> p.Chain:
    return p.Chain(
        session,
        camera,
        first,
        first + count - 1,
        "00" * 32,
        "ab" * 32,
        "0123456789abcdef",
        p.b64url(b"s" * 64),
        tuple((1_700_000_000_000_000 + i, int(i == 0), "cd" * 32) for i in range(count)),
    )


def test_chain_and_chain_ack_round_trip() -> None:
    pair = Pair()
    pair.handshake()
    pair.send(pair.agent, open_event())
    pair.send(pair.agent, chain_event())
    pair.send(pair.agent, chain_event(first=13, count=p.MAX_CHAIN_ENTRIES))
    pair.send(pair.receiver, p.ChainAck("s1", 1, 10, 12, "ok"))
    pair.send(pair.receiver, p.ChainAck("s1", 1, 13, 268, "bad_signature"))
    pair.send(pair.receiver, p.ChainAck("s0", 7, 1, 2, "ok"))  # another session: not checked
    wire = p.encode_control(chain_event(count=1))
    assert json.loads(wire) == {
        "type": "chain", "session": "s1", "camera": 1, "first": 10, "last": 10,
        "prev": "00" * 32, "head": "ab" * 32, "kid": "0123456789abcdef",
        "sig": p.b64url(b"s" * 64), "entries": [[1_700_000_000_000_000, 1, "cd" * 32]],
    }  # fmt: skip


def _chain_json(count: int = 3, **changes: object) -> str:
    doc = json.loads(p.encode_control(chain_event(count=count)))
    doc.update(changes)
    return json.dumps(doc)


@pytest.mark.parametrize(
    "message",
    [
        _chain_json(last=13),  # entries do not cover first..last
        _chain_json(first=13, last=12),
        _chain_json(prev="AB" * 32),  # upper-case hex
        _chain_json(head="ab" * 31),
        _chain_json(kid="0123"),
        _chain_json(sig=p.b64url(b"s" * 63)),  # not an Ed25519 signature
        _chain_json(entries=[[1, 2, "cd" * 32]] * 3),  # flags other than keyframe
        _chain_json(entries=[[True, 0, "cd" * 32]] * 3),
        _chain_json(entries=[[1, 0, "zz" * 32]] * 3),
        _chain_json(entries=[[1, 0]] * 3),
        _chain_json(extra=1),
        _chain_json(count=p.MAX_CHAIN_ENTRIES + 1),  # too many entries in one message
        '{"type":"chain_ack","session":"s1","camera":1,"first":5,"last":4,"result":"ok"}',
        '{"type":"chain_ack","session":"s1","camera":1,"first":5,"last":6,"result":""}',
    ],
)
def test_malformed_chain_messages_are_refused(message: str) -> None:
    pair = Pair()
    pair.handshake()
    pair.send(pair.agent, open_event())
    end = pair.agent if '"chain_ack"' in message else pair.receiver
    with pytest.raises(p.RemoteProtocolError) as info:
        end.receive(message)
    assert info.value.code == "malformed"


def test_chain_order_and_sides_are_enforced() -> None:
    pair = Pair()
    pair.handshake()
    with pytest.raises(p.RemoteProtocolError) as info:
        pair.receiver.receive(p.encode_control(chain_event()))  # before session_open
    assert info.value.code == "unknown_camera"
    pair.send(pair.agent, open_event(cameras=1))
    with pytest.raises(p.RemoteProtocolError) as info:
        pair.receiver.receive(p.encode_control(chain_event()))  # camera index 1 of 1
    assert info.value.code == "unknown_camera"
    with pytest.raises(p.RemoteProtocolError) as info:
        pair.receiver.receive(p.encode_control(chain_event(camera=0, session="other")))
    assert info.value.code == "unknown_camera"
    with pytest.raises(p.RemoteProtocolError) as info:
        pair.agent.receive(p.encode_control(p.ChainAck("s1", 3, 1, 2, "ok")))
    assert info.value.code == "unknown_camera"
    with pytest.raises(p.LocalProtocolError):
        pair.receiver.send(chain_event(camera=0))  # the receiver never sends checkpoints
    with pytest.raises(p.LocalProtocolError):
        pair.agent.send(p.ChainAck("s1", 0, 1, 2, "ok"))


def test_access_head_goes_from_receiver_to_agent_only() -> None:
    pair = Pair()
    pair.handshake()
    pair.send(pair.receiver, p.AccessHead(42, "ab" * 32))
    with pytest.raises(p.LocalProtocolError):
        pair.agent.send(p.AccessHead(42, "ab" * 32))
    for bad in (
        '{"type":"access_head","n":1,"hash":"AB' + "ab" * 31 + '"}',  # upper-case hex
        '{"type":"access_head","n":1,"hash":"' + "ab" * 31 + '"}',  # too short
        '{"type":"access_head","n":-1,"hash":"' + "ab" * 32 + '"}',
        '{"type":"access_head","n":true,"hash":"' + "ab" * 32 + '"}',
        '{"type":"access_head","n":1,"hash":"' + "ab" * 32 + '","x":1}',
    ):
        with pytest.raises(p.RemoteProtocolError) as info:
            pair.agent.receive(bad)
        assert info.value.code == "malformed"


def test_a_heartbeat_time_too_long_for_a_float_reads_as_no_time() -> None:
    """Its float() overflowed: a traceback at the receiver, the device's uplink cut. A
    heartbeat's time is the peer's word (the receiver ignores one that is no time)."""
    event = decode_control('{"type":"heartbeat","t":1' + "0" * 400 + "}")
    assert isinstance(event, p.Heartbeat) and event.t == math.inf
