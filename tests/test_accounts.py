"""Police accounts (receiver/accounts.py) and ``breakglass receiver user``: SQLite, argon2id."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from receiver.accounts import (
    AccountExistsError,
    AccountStore,
    InvalidNameError,
    LockoutPolicy,
    LoginOutcome,
    PasswordParams,
    PasswordPolicyError,
    Role,
    SessionPolicy,
    UnknownAccountError,
    check_password,
)
from tests.logins import FAST, PASSWORD
from tests.test_receiver_cli_data import served

CLI = [sys.executable, "-m", "breakglass"]


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[AccountStore]:
    with AccountStore(
        tmp_path / "accounts.sqlite",
        params=FAST,
        lockout=LockoutPolicy(max_failures=3, lockout_s=600),
        sessions=SessionPolicy(idle_timeout_s=300, lifetime_s=3600, touch_every_s=10),
        clock=clock,
    ) as s:
        yield s


def test_roles_nest() -> None:
    assert Role.ADMIN.includes(Role.DISPATCHER) and Role.ADMIN.includes(Role.OFFICER)
    assert Role.DISPATCHER.includes(Role.OFFICER) and not Role.DISPATCHER.includes(Role.ADMIN)
    assert not Role.OFFICER.includes(Role.DISPATCHER)


@pytest.mark.parametrize(
    ("password", "name", "message"),
    [
        ("short pass", "alice", "at least 12 characters"),
        ("x" * 1025, "alice", "at most 1024"),
        ("alice-is-my-password", "alice", "must not contain the account name"),
        ("Password1234", "alice", "too common"),
        ("aaaaaaaaaaaaaaa", "alice", "too common"),
        ("abababababababab", "alice", "too common"),
    ],
)
def test_password_policy(password: str, name: str, message: str) -> None:
    with pytest.raises(PasswordPolicyError, match=message) as err:
        check_password(password, name)
    assert isinstance(err.value, ValueError)


def test_no_default_account_and_a_file_only_its_owner_reads(
    store: AccountStore, tmp_path: Path
) -> None:
    assert store.count() == 0
    assert store.accounts() == []
    store.add("alice", Role.OFFICER, PASSWORD)
    for name in ("accounts.sqlite", "accounts.sqlite-wal", "accounts.sqlite-shm"):
        path = tmp_path / name
        assert not path.exists() or os.stat(path).st_mode & 0o777 == 0o600, name
    mode = sqlite3.connect(tmp_path / "accounts.sqlite").execute("PRAGMA journal_mode").fetchone()
    assert mode == ("wal",)


def test_add_and_authenticate(store: AccountStore) -> None:
    info = store.add("alice", Role.DISPATCHER, PASSWORD)
    assert (info.name, info.role, info.disabled, info.last_login) == (
        "alice",
        Role.DISPATCHER,
        False,
        None,
    )
    with pytest.raises(AccountExistsError):
        store.add("alice", Role.OFFICER, "another long passphrase")
    with pytest.raises(InvalidNameError):
        store.add("Alice Smith", Role.OFFICER, PASSWORD)
    (stored,) = sqlite3.connect(store.path).execute("SELECT hash FROM users").fetchone()
    assert stored.startswith("$argon2id$v=19$m=1024,t=1,p=1$")
    assert PASSWORD not in stored
    ok = store.authenticate("alice", PASSWORD)
    assert (ok.outcome, ok.role, ok.rehashed) == (LoginOutcome.OK, Role.DISPATCHER, False)
    assert store.get("alice").last_login == store.clock()
    assert store.authenticate("alice", PASSWORD + "x").outcome is LoginOutcome.INVALID


def test_a_login_rehashes_when_the_parameters_changed(tmp_path: Path) -> None:
    path = tmp_path / "accounts.sqlite"
    with AccountStore(path, params=FAST) as old:
        old.add("alice", Role.OFFICER, PASSWORD)
    stronger = PasswordParams(time_cost=2, memory_cost_kib=2048, parallelism=1)
    with AccountStore(path, params=stronger) as new:
        first = new.authenticate("alice", PASSWORD)
        assert (first.outcome, first.rehashed) == (LoginOutcome.OK, True)
        (stored,) = sqlite3.connect(path).execute("SELECT hash FROM users").fetchone()
        assert stored.startswith("$argon2id$v=19$m=2048,t=2,p=1$")
        assert new.authenticate("alice", PASSWORD).rehashed is False


def test_default_parameters_are_rfc9106s_second_recommendation() -> None:
    params = PasswordParams()
    assert (params.time_cost, params.memory_cost_kib, params.parallelism) == (3, 65536, 4)
    assert (params.hash_len, params.salt_len) == (32, 16)


def test_lockout_after_n_failures_then_it_expires(store: AccountStore, clock: Clock) -> None:
    store.add("alice", Role.OFFICER, PASSWORD)
    assert store.authenticate("alice", "wrong password 1").outcome is LoginOutcome.INVALID
    assert store.authenticate("alice", "wrong password 2").locked_now is False
    third = store.authenticate("alice", "wrong password 3")
    assert (third.outcome, third.locked_now, third.locked_until) == (
        LoginOutcome.INVALID,
        True,
        clock.t + 600,
    )
    locked = store.authenticate("alice", PASSWORD)  # the right one is refused too
    assert (locked.outcome, locked.locked_until) == (LoginOutcome.LOCKED, clock.t + 600)
    clock.t += 600
    assert store.authenticate("alice", PASSWORD).outcome is LoginOutcome.OK


def test_a_success_resets_the_failure_count(store: AccountStore) -> None:
    store.add("alice", Role.OFFICER, PASSWORD)
    for _ in range(2):
        store.authenticate("alice", "wrong password!!")
    assert store.authenticate("alice", PASSWORD).outcome is LoginOutcome.OK
    for _ in range(2):
        assert store.authenticate("alice", "wrong password!!").outcome is LoginOutcome.INVALID


class CountingHasher:
    """Wraps the real hasher, counting verifications."""

    def __init__(self, store: AccountStore) -> None:
        self.inner = store._hasher
        self.verified = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def verify(self, digest: str, password: str) -> bool:
        self.verified += 1
        return bool(self.inner.verify(digest, password))


def test_unknown_names_cost_a_hash_and_lock_like_known_ones(store: AccountStore) -> None:
    counter = CountingHasher(store)
    store._hasher = counter  # type: ignore[assignment]
    store.add("alice", Role.OFFICER, PASSWORD)
    known = [store.authenticate("alice", "wrong password!!") for _ in range(3)]
    unknown = [store.authenticate("mallory", "wrong password!!") for _ in range(3)]
    assert counter.verified == 6  # one argon2 verification each, account or not
    assert [r.outcome for r in known] == [r.outcome for r in unknown]
    assert [r.locked_now for r in known] == [r.locked_now for r in unknown] == [False, False, True]
    assert store.authenticate("mallory", "x" * 12).outcome is LoginOutcome.LOCKED
    assert counter.verified == 6  # a locked name is refused without hashing


def test_disable_ends_sessions_and_refuses_logins(store: AccountStore) -> None:
    store.add("alice", Role.OFFICER, PASSWORD)
    new = store.create_session("alice", "127.0.0.1")
    assert store.lookup_session(new.token) is not None
    store.set_disabled("alice", True)
    assert store.lookup_session(new.token) is None
    assert store.authenticate("alice", PASSWORD).outcome is LoginOutcome.DISABLED
    store.set_disabled("alice", False)
    assert store.authenticate("alice", PASSWORD).outcome is LoginOutcome.OK
    with pytest.raises(UnknownAccountError):
        store.set_disabled("bob", True)


def test_password_change_ends_sessions(store: AccountStore) -> None:
    store.add("alice", Role.OFFICER, PASSWORD)
    new = store.create_session("alice")
    store.set_password("alice", "a brand new passphrase")
    assert store.lookup_session(new.token) is None
    assert store.authenticate("alice", PASSWORD).outcome is LoginOutcome.INVALID
    assert store.authenticate("alice", "a brand new passphrase").outcome is LoginOutcome.OK


def test_sessions_are_stored_hashed_and_time_out(store: AccountStore, clock: Clock) -> None:
    store.add("alice", Role.OFFICER, PASSWORD)
    new = store.create_session("alice")
    assert len(new.token) >= 43  # 256 bits, base64url
    (stored,) = sqlite3.connect(store.path).execute("SELECT token_hash FROM sessions").fetchone()
    assert new.token not in stored and new.handle == stored[:16]
    info = store.lookup_session(new.token)
    assert info is not None and (info.name, info.role, info.csrf) == (
        "alice",
        Role.OFFICER,
        new.csrf,
    )
    # Idle: 300 s without a request ends it; each request (noted every 10 s) keeps it alive.
    for _ in range(15):  # 3000 s, within the hour's lifetime
        clock.t += 200
        assert store.lookup_session(new.token) is not None
    clock.t += 300
    assert store.lookup_session(new.token) is None
    # Absolute: an hour after the login, however busy.
    busy = store.create_session("alice")
    for _ in range(17):
        clock.t += 200
        assert store.lookup_session(busy.token) is not None
    clock.t += 200
    assert store.lookup_session(busy.token) is None
    assert store.lookup_session("") is None and store.lookup_session("nope") is None


def test_a_role_change_applies_to_live_sessions(store: AccountStore) -> None:
    store.add("alice", Role.OFFICER, PASSWORD)
    new = store.create_session("alice")
    store.set_role("alice", Role.ADMIN)
    info = store.lookup_session(new.token)
    assert info is not None and info.role is Role.ADMIN


def test_losing_rights_is_stamped(store: AccountStore, clock: Clock) -> None:
    # What player links made before are checked against (receiver.player_links).
    store.add("alice", Role.DISPATCHER, PASSWORD)
    assert store.get("alice").rights_lost == 0
    clock.t += 10
    store.set_role("alice", Role.ADMIN)  # includes the old role: nothing lost
    assert store.get("alice").rights_lost == 0
    store.set_role("alice", Role.OFFICER)
    assert store.get("alice").rights_lost == clock.t
    clock.t += 10
    store.set_role("alice", Role.DISPATCHER)
    store.set_disabled("alice", True)
    assert store.get("alice").rights_lost == clock.t
    clock.t += 10
    store.set_disabled("alice", False)  # enabling again gives nothing back
    assert store.get("alice").rights_lost == clock.t - 10
    with pytest.raises(UnknownAccountError):
        store.set_role("bob", Role.OFFICER)


def test_a_database_from_before_rights_lost_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "accounts.sqlite"
    with AccountStore(path, params=FAST) as first:
        first.add("alice", Role.OFFICER, PASSWORD)
    old = sqlite3.connect(path)
    old.execute("ALTER TABLE users DROP COLUMN rights_lost")  # as the table was made before
    old.commit()
    old.close()
    with AccountStore(path, params=FAST) as again:
        assert again.get("alice").rights_lost == 0
        assert again.authenticate("alice", PASSWORD).outcome is LoginOutcome.OK
        again.set_disabled("alice", True)
        assert again.get("alice").rights_lost > 0


# -- the command line ------------------------------------------------------------------


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


def test_cli_user_add_list_disable_passwd_and_the_access_log(tmp_path: Path) -> None:
    data = served(tmp_path / "rx")  # README: accounts are added once the receiver has started
    pw = tmp_path / "pw.txt"
    pw.write_text(PASSWORD + "\n")
    added = run("receiver", "user", "add", "alice", "--role", "admin", "--data", str(data),
                "--password-file", str(pw))  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert "account alice (admin) created" in added.stdout
    bob = run("receiver", "user", "add", "bob", "--role", "officer", "--data", str(data),
              "--password-file", "-", stdin="another long passphrase\n")  # fmt: skip
    assert bob.returncode == 0, bob.stderr
    weak = run("receiver", "user", "add", "carol", "--role", "officer", "--data", str(data),
               "--password-file", "-", stdin="short\n")  # fmt: skip
    assert weak.returncode == 2
    assert "at least 12 characters" in weak.stderr
    no_tty = run("receiver", "user", "add", "carol", "--role", "officer", "--data", str(data),
                 stdin="")  # fmt: skip
    assert no_tty.returncode == 2
    assert "no terminal to ask for the password" in no_tty.stderr
    listed = run("receiver", "user", "list", "--data", str(data))
    assert listed.returncode == 0
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["NAME", "ROLE", "STATE", "LAST", "LOGIN"]
    assert lines[1].split()[:3] == ["alice", "admin", "active"]
    assert lines[2].split()[:3] == ["bob", "officer", "active"]
    assert run("receiver", "user", "disable", "bob", "--data", str(data)).returncode == 0
    assert "disabled" in run("receiver", "user", "list", "--data", str(data)).stdout
    assert run("receiver", "user", "role", "bob", "dispatcher", "--data", str(data)).returncode == 0
    passwd = run("receiver", "user", "passwd", "bob", "--data", str(data), "--password-file", "-",
                 stdin="yet another passphrase\n")  # fmt: skip
    assert passwd.returncode == 0, passwd.stderr
    unknown = run("receiver", "user", "disable", "zed", "--data", str(data))
    assert unknown.returncode == 2
    assert "no account 'zed'" in unknown.stderr
    with AccountStore(data / "accounts.sqlite", params=FAST) as store:
        bob_now = store.get("bob")
        assert (bob_now.role, bob_now.disabled) == (Role.DISPATCHER, True)
        assert store.authenticate("bob", "yet another passphrase").outcome is LoginOutcome.DISABLED
    verified = run("receiver", "access", "verify", "--data", str(data))
    assert verified.returncode == 0, verified.stdout
    assert verified.stdout.startswith("OK: 5 entries, chain intact; head ")
    log_text = (data / "access.log").read_text()
    assert PASSWORD not in log_text and "yet another passphrase" not in log_text
    assert os.stat(data / "access.log").st_mode & 0o777 == 0o600


def test_cli_has_no_password_option() -> None:
    result = run("receiver", "user", "add", "alice", "--role", "officer", "--data", "x",
                 "--password", PASSWORD)  # fmt: skip
    assert result.returncode == 2
    assert "a password is never taken on the command line" in result.stderr
    assert PASSWORD not in result.stderr + result.stdout
