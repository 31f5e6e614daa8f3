"""Pairing by setup code (SPAKE2): the right code pairs, nothing else does."""

from __future__ import annotations

import contextlib
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from provisioning.pairing import (
    CODE_DIGITS,
    GLOBAL_BURST,
    GLOBAL_PACE_S,
    MAX_FAILURES,
    RETRY_AFTER_FAILURE_S,
    SLOW_RETRY_S,
    WINDOW_S,
    DevicePairing,
    PairingError,
    PairingWindow,
    TechnicianPairing,
    client_key,
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


def test_the_window_closes_on_time_and_on_success_and_slows_a_guesser_down() -> None:
    window = PairingWindow(duration_s=900, max_failures=MAX_FAILURES, retry_after_s=2)
    with pytest.raises(PairingError, match="pairing_closed"):
        window.check(0.0)  # never opened
    window.open(100.0)
    window.check(100.0, "10.0.0.9")
    window.failed(101.0, "10.0.0.9")
    with pytest.raises(PairingError) as paused:
        window.check(102.0, "10.0.0.9")
    assert paused.value.code == "rate_limited"
    window.check(103.0, "10.0.0.9")
    for i in range(MAX_FAILURES - 1):
        window.failed(110.0 + 3 * i, "10.0.0.9")
    # Ten wrong codes from one address: that address slows down; pairing stays open.
    with pytest.raises(PairingError) as slowed:
        window.check(300.0, "10.0.0.9")
    assert slowed.value.code == "rate_limited" and slowed.value.retry_after_s == 134
    window.check(300.0, "10.0.0.7")  # the technician, at another address
    window.check(134.0 + SLOW_RETRY_S, "10.0.0.9")  # one more, five minutes later
    # The long button hold opens a new window; it expires after 15 minutes.
    window.open(600.0)
    window.check(1499.0, "10.0.0.9")
    with pytest.raises(PairingError, match="pairing_closed"):
        window.check(1500.0)
    window.open(2000.0)
    window.failed(2000.0, "10.0.0.7")
    window.succeeded("10.0.0.7")
    assert window.failures == 0 and window.attempts("10.0.0.7") == 0  # the code was right
    with pytest.raises(PairingError, match="pairing_closed"):
        window.check(2001.0)


def test_guessing_from_one_address_is_bounded_and_never_closes_pairing() -> None:
    window = PairingWindow()
    window.open(0.0)
    device_code = new_setup_code()
    now, tried = 0.0, 0
    while True:
        try:
            window.check(now, "10.0.0.66")
        except PairingError as exc:
            if exc.code == "rate_limited":
                now += 0.5
                continue
            break
        tried += 1
        device = DevicePairing(device_code, DEVICE)
        guess = TechnicianPairing(new_setup_code(), DEVICE)
        msg, confirm = device.respond(guess.start())
        window.failed(now, "10.0.0.66")  # counted when it starts (the answer tests it)
        with pytest.raises(PairingError):
            device.confirm(guess.finish(msg, confirm))
    assert now >= WINDOW_S  # closed by its time, not by the guesses
    # Ten 2 s apart (18 s), then one per five minutes until the window ends.
    assert tried == MAX_FAILURES + int((WINDOW_S - 2 * (MAX_FAILURES - 1)) // SLOW_RETRY_S)


def attack(window: PairingWindow, start: float, end: float) -> int:
    """A guesser with as many addresses as it likes, each fresh (so never paused by
    its own budget), trying every half second: how many guesses it gets."""
    fresh = (f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in itertools.count(1))
    now, tried, refused = start, 0, ""
    while now < end:
        while True:
            client = next(fresh)
            try:
                window.check(now, client)
            except PairingError as exc:
                refused = exc.code
                break
            window.failed(now, client)
            tried += 1
        assert refused == "rate_limited"  # never closed by guessing
        now += 0.5
    return tried


def test_guessing_from_many_addresses_is_bounded_by_the_global_pace() -> None:
    window = PairingWindow()
    window.open(0.0)
    assert attack(window, 0.0, WINDOW_S) <= GLOBAL_BURST + WINDOW_S / GLOBAL_PACE_S  # 45
    # A window open all day (an unprovisioned device's, configured so): the bound per
    # day, against the setup code's entropy (10^8 codes, less the trivial ones).
    day = 86_400.0
    window = PairingWindow(duration_s=day)
    window.open(0.0)
    per_day = attack(window, 0.0, day)
    assert per_day <= GLOBAL_BURST + day / GLOBAL_PACE_S  # 1,470
    codes = 10**CODE_DIGITS - 11_460  # less the trivial ones (never made)
    assert per_day / codes < 1.5e-5  # a guesser's chance per day of open window


def test_a_technician_at_another_address_gets_in_while_one_guesses() -> None:
    window = PairingWindow()
    window.open(0.0)
    now = 0.0
    for _ in range(MAX_FAILURES + 5):  # the guesser tries as fast as it is let
        with contextlib.suppress(PairingError):
            window.check(now, "10.0.0.66")
            window.failed(now, "10.0.0.66")
        now += RETRY_AFTER_FAILURE_S
    window.check(now, "10.0.0.7")  # no pause, no closing for the technician
    window.failed(now, "10.0.0.7")
    window.succeeded("10.0.0.7", close=False)
    with pytest.raises(PairingError) as slowed:
        window.check(now, "10.0.0.66")
    assert slowed.value.code == "rate_limited"


def test_budgets_are_per_ipv4_address_and_per_ipv6_64() -> None:
    assert client_key("10.0.0.66") == "10.0.0.66"
    assert client_key("10.0.0.66") != client_key("10.0.0.67")
    # One host may take any address in its /64: one budget for all of them.
    assert client_key("2001:db8:1:2::1") == client_key("2001:db8:1:2:ffff:ffff:ffff:ffff")
    assert client_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("fe80::1%eth0") == "fe80::/64"
    assert client_key("::ffff:10.0.0.66") == "10.0.0.66"  # IPv4-mapped: the IPv4 address
    assert client_key("?") == "?"
    window = PairingWindow(max_failures=1)
    window.open(0.0)
    window.failed(0.0, client_key("2001:db8:1:2::1"))
    with pytest.raises(PairingError, match="rate_limited"):
        window.check(10.0, client_key("2001:db8:1:2::beef"))
    window.check(10.0, client_key("2001:db8:1:3::1"))


def test_clients_remembered_are_bounded_and_the_global_pace_still_holds() -> None:
    window = PairingWindow(max_clients=8, global_burst=5, global_pace_s=10.0)
    window.open(0.0)
    for i in range(5):
        window.check(0.0, f"10.0.0.{i}")
        window.failed(0.0, f"10.0.0.{i}")
    with pytest.raises(PairingError) as limited:
        window.check(0.0, "10.0.0.200")  # a fresh address, but the bucket is empty
    assert limited.value.code == "rate_limited" and limited.value.retry_after_s == 10
    window.check(10.0, "10.0.0.200")
    for i in range(20):
        window.failed(10.0 * i, f"10.0.1.{i}")
    assert len(window._clients) == 8  # the bound is the point
