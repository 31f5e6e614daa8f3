"""Shared pytest fixtures. Keep each fixture small and generic; add yours below."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from gpiozero import Device
from gpiozero.pins.mock import MockFactory

from receiver.accounts import Role
from receiver.server import Receiver
from tests.logins import FAST, logged_in
from tests.media import PacketList, make_h264_packets


@pytest.fixture
def mock_factory() -> Iterator[MockFactory]:
    """A fresh gpiozero ``MockFactory``, also installed as the default pin factory.

    Pass it as ``pin_factory=``; code that relies on the default gets it too.
    Tests close their devices; afterwards the factory is reset (pins and
    reservations cleared) so the next test can claim the same pins, and the
    previous default factory comes back.
    """
    factory = MockFactory()
    previous = Device.pin_factory
    Device.pin_factory = factory
    try:
        yield factory
    finally:
        Device.pin_factory = previous
        factory.close()
        factory.reset()


@pytest.fixture(scope="module")
def packets() -> PacketList:
    """90 H.264 frames, 320x240, keyframes at 0, 30 and 60."""
    return make_h264_packets(90)


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves a thread running: every resource must be closed."""
    before = set(threading.enumerate())
    yield
    leaked = []
    for thread in set(threading.enumerate()) - before:
        thread.join(timeout=5)  # a thread that is ending gets a moment to end
        if thread.is_alive():
            leaked.append(thread.name)
    assert not leaked, f"threads left running: {sorted(leaked)}"


@pytest.fixture
async def receiver(tmp_path: Path) -> AsyncIterator[Receiver]:
    """A police receiver on 127.0.0.1 (an ephemeral port), data in ``tmp_path/receiver``.

    Passwords are hashed cheaply (:data:`tests.logins.FAST`); log in with
    ``officer_session`` or :func:`tests.logins.logged_in`.
    """
    async with Receiver(tmp_path / "receiver", "127.0.0.1", 0, password_params=FAST) as rx:
        yield rx


@pytest.fixture
async def officer_session(receiver: Receiver) -> AsyncIterator[aiohttp.ClientSession]:
    """A client logged in to ``receiver`` as an officer (cookie, Origin and CSRF header set)."""
    async with logged_in(receiver, Role.OFFICER) as http:
        yield http
