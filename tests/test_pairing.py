"""Pairing by setup code (SPAKE2): the right code pairs, nothing else does."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from provisioning.pairing import (
    MAX_FAILURES,
    DevicePairing,
    PairingError,
    PairingWindow,
    TechnicianPairing,
    new_setup_code,
    normalise_code,
    show_code,
    trivial,
)

DEVICE = "lincoln-pi-1"


def pair(tech_code: str, device_code: str) -> tuple[TechnicianPairing, DevicePairing]:
    tech, device = TechnicianPairing(tech_code, DEVICE), DevicePairing(device_code, DEVICE)
    device_msg, device_confirm = device.respond(tech.start())
    device.confirm(tech.finish(device_msg, device_confirm))
    return tech, device


def test_the_right_code_pairs_and_both_sides_share_a_sealed_channel() -> None:
    code = new_setup_code()
    tech, device = pair(show_code(code), code)  # typed with its dash
    assert tech.channel is not None and device.channel is not None
    box = device.channel.seal(b'{"public_key": "...", "fp": "sha256:..."}')
    assert tech.channel.open(box) == b'{"public_key": "...", "fp": "sha256:..."}'
    enrollment = tech.channel.seal(b"enrollment")
    assert device.channel.open(enrollment) == b"enrollment"
    with pytest.raises(PairingError) as replayed:
        device.channel.open(enrollment)  # the same box twice: the counter moved on
    assert replayed.value.code == "bad_box"


def test_a_wrong_code_fails_on_both_sides() -> None:
    tech, device = TechnicianPairing("2718-2818", DEVICE), DevicePairing("31415926", DEVICE)
    device_msg, device_confirm = device.respond(tech.start())
    with pytest.raises(PairingError) as refused:
        tech.finish(device_msg, device_confirm)
    assert refused.value.code == "wrong_code"
    with pytest.raises(PairingError) as also:
        device.confirm(b"\0" * 32)  # whatever a technician without the code sends
    assert also.value.code == "wrong_code"
    assert device.channel is None


def test_the_code_binds_the_device_id() -> None:
    code = new_setup_code()
    tech, device = TechnicianPairing(code, "other-pi"), DevicePairing(code, DEVICE)
    device_msg, device_confirm = device.respond(tech.start())
    with pytest.raises(PairingError):
        tech.finish(device_msg, device_confirm)


def test_a_man_in_the_middle_who_does_not_know_the_code_completes_nothing() -> None:
    """An intercepting relay runs SPAKE2 itself with each side, with its best guess."""
    code = "58201937"
    guess = "58201938"
    tech, device = TechnicianPairing(code, DEVICE), DevicePairing(code, DEVICE)
    # Towards the device, the relay poses as the technician ...
    fake_tech = TechnicianPairing(guess, DEVICE)
    device_msg, device_confirm = device.respond(fake_tech.start())
    with pytest.raises(PairingError):
        fake_tech.finish(device_msg, device_confirm)  # its guess is wrong: it learns that only
    with pytest.raises(PairingError):
        device.confirm(b"\x01" * 32)
    # ... towards the technician, as the device.
    fake_device = DevicePairing(guess, DEVICE)
    msg, confirm = fake_device.respond(tech.start())
    with pytest.raises(PairingError) as refused:
        tech.finish(msg, confirm)
    assert refused.value.code == "wrong_code"
    assert tech.channel is None and device.channel is None


def test_a_passive_relay_passes_messages_it_cannot_read_or_change() -> None:
    code = new_setup_code()
    tech, device = pair(code, code)  # the relay forwarded every message unchanged
    assert tech.channel is not None and device.channel is not None
    box = bytearray(tech.channel.seal(b"enrollment"))
    box[3] ^= 1  # ... and now changes one bit
    with pytest.raises(PairingError) as tampered:
        device.channel.open(bytes(box))
    assert tampered.value.code == "bad_box"


@settings(max_examples=50, deadline=None)
@given(garbage=st.binary(max_size=100))
def test_garbage_instead_of_a_spake2_message_is_a_clear_error(garbage: bytes) -> None:
    device = DevicePairing("58201937", DEVICE)
    with pytest.raises(PairingError) as refused:
        device.respond(garbage)
    assert refused.value.code == "malformed"


def test_setup_codes_are_random_and_never_trivial() -> None:
    codes = {new_setup_code() for _ in range(200)}
    assert len(codes) == 200
    assert all(len(c) == 8 and c.isdigit() and not trivial(c) for c in codes)
    for code in ("12345678", "87654321", "11111111", "00000000", "12121212", "90123456"):
        assert trivial(code), code
    assert not trivial("58201937")
    assert normalise_code(" 5820-1937 ") == "58201937"
    for bad in ("5820193", "582019377", "5820193a", "٥٨٢٠١٩٣٧"):
        with pytest.raises(PairingError):
            normalise_code(bad)


def test_the_window_closes_on_time_on_success_and_after_too_many_wrong_codes() -> None:
    window = PairingWindow(duration_s=900, max_failures=MAX_FAILURES, retry_after_s=2)
    with pytest.raises(PairingError, match="pairing_closed"):
        window.check(0.0)  # never opened
    window.open(100.0)
    window.check(100.0)
    window.failed(101.0)
    with pytest.raises(PairingError) as paused:
        window.check(102.0)
    assert paused.value.code == "rate_limited"
    window.check(103.0)
    for i in range(MAX_FAILURES - 1):
        window.failed(110.0 + 3 * i)
    with pytest.raises(PairingError, match="too many"):
        window.check(500.0)
    # The long button hold opens a new window; it expires after 15 minutes.
    window.open(600.0)
    window.check(1499.0)
    with pytest.raises(PairingError, match="pairing_closed"):
        window.check(1500.0)
    window.open(2000.0)
    window.succeeded()
    with pytest.raises(PairingError, match="pairing_closed"):
        window.check(2001.0)


def test_guessing_within_one_window_is_bounded() -> None:
    # Ten guesses of a random code out of 10^8 (minus the trivial ones).
    window = PairingWindow()
    window.open(0.0)
    device_code = new_setup_code()
    now, tried = 0.0, 0
    while True:
        try:
            window.check(now)
        except PairingError as exc:
            if exc.code == "rate_limited":
                now += 0.5
                continue
            break
        tried += 1
        device = DevicePairing(device_code, DEVICE)
        guess = TechnicianPairing(new_setup_code(), DEVICE)
        msg, confirm = device.respond(guess.start())
        try:
            device.confirm(guess.finish(msg, confirm))
        except PairingError:
            window.failed(now)
    assert tried == MAX_FAILURES
