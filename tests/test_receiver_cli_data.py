"""``--data`` of the receiver's commands names a receiver's data folder, never a new one.

A typo in the path (``receivr``) used to start an empty receiver there: ``user add``
said the account was created, ``user list`` that there were none yet. The folder is
a receiver's once ``breakglass receiver serve`` has started in it (README: serve,
then add the accounts); anything else is exit 2, and nothing is made.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from breakglass.cli import main
from receiver.server import Receiver
from tests.logins import FAST, PASSWORD


def served(data: Path) -> Path:
    """``data`` after a real receiver's first start and stop (what ``receiver serve`` makes)."""

    async def start_and_stop() -> None:
        async with Receiver(data, "127.0.0.1", 0, password_params=FAST):
            pass

    asyncio.run(start_and_stop())
    return data


def cli(*args: str | Path) -> int:
    return main([str(a) for a in args])


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def no_receiver_data(path: Path) -> str:
    return (
        f"breakglass: error: no receiver data at {path}: run `breakglass receiver serve "
        f"--data {path}` first, or check the path\n"
    )


def test_a_mistyped_data_folder_is_an_error_and_nothing_is_made(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = served(tmp_path / "d" / "receiver")
    before = tree(tmp_path)
    pw = tmp_path / "pw.txt"
    pw.write_text(PASSWORD + "\n")
    typo, nothere = tmp_path / "d" / "receivr", tmp_path / "nothere"
    empty = tmp_path / "empty"  # a folder, but no receiver ever ran in it
    empty.mkdir()
    for folder in (typo, nothere, empty):
        commands: list[list[str | Path]] = [
            ["receiver", "user", "add", "jdoe", "--role", "officer", "--password-file", pw],
            ["receiver", "user", "list"],
            ["receiver", "user", "disable", "jdoe"],
            ["receiver", "user", "enable", "jdoe"],
            ["receiver", "user", "passwd", "jdoe", "--password-file", pw],
            ["receiver", "user", "role", "jdoe", "admin"],
            ["evidence", "key"],
            ["evidence", "export", "--session", "s1", "--out", tmp_path / "case.zip"],
        ]
        for command in commands:
            assert cli(*command, "--data", folder) == 2, command
            out, err = capsys.readouterr()
            assert (out, err) == ("", no_receiver_data(folder)), command
    assert not typo.exists() and not nothere.exists() and not any(empty.iterdir())
    assert tree(tmp_path) == sorted([*before, "pw.txt", "empty"])

    # The real one works, with the same commands.
    assert cli("receiver", "user", "add", "jdoe", "--role", "officer", "--data", data,
               "--password-file", pw) == 0  # fmt: skip
    assert (
        f"account jdoe (officer) created in {data / 'accounts.sqlite'}" in capsys.readouterr().out
    )
    assert cli("receiver", "user", "list", "--data", data) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[:3] == ["jdoe", "officer", "active"]


def test_a_password_file_that_cannot_be_read_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = served(tmp_path / "receiver")
    nope = tmp_path / "nope.txt"
    assert cli("receiver", "user", "add", "jdoe", "--role", "officer", "--data", data,
               "--password-file", nope) == 2  # fmt: skip
    assert capsys.readouterr().err == (
        f"breakglass: error: --password-file {nope}: No such file or directory\n"
    )
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"caf\xe9 caf\xe9 caf\xe9\n")
    assert cli("receiver", "user", "add", "jdoe", "--role", "officer", "--data", data,
               "--password-file", latin1) == 2  # fmt: skip
    assert (
        capsys.readouterr().err == f"breakglass: error: --password-file {latin1}: not UTF-8 text\n"
    )
    assert cli("receiver", "user", "list", "--data", data) == 0
    assert capsys.readouterr().out.startswith("no accounts yet")
    assert not (data / "access.log").exists()  # nothing was done, so nothing logged


def test_a_receiver_folder_is_recognised_by_what_serve_makes(tmp_path: Path) -> None:
    """Guards the markers: each is made by the first start (and is still there after it)."""
    from breakglass.accounts_cli import RECEIVER_MARKERS

    data = served(tmp_path / "receiver")
    assert all((data / marker).exists() for marker in RECEIVER_MARKERS)


def test_a_data_folder_of_another_user_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``sudo breakglass receiver user add`` on the service's folder made a root-owned
    access log the receiver could no longer write: every access went unlogged."""
    if os.geteuid() != 0:
        pytest.skip("making a folder another user owns needs root")  # CI runs as root
    data = served(tmp_path / "receiver")
    os.chown(data, 54321, 54321)
    before = tree(data)
    assert cli("receiver", "user", "list", "--data", data) == 2
    assert f"receiver data at {data} belongs to uid 54321: run this as" in capsys.readouterr().err
    assert cli("receiver", "serve", "--data", data, "--port", "0") == 2
    assert f"--data {data} belongs to uid 54321: run the receiver as" in capsys.readouterr().err
    assert tree(data) == before
