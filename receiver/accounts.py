"""Police accounts and their login sessions, in one SQLite file (``DATA/accounts.sqlite``).

Theory of operation
-------------------
An account has a name, a role and an argon2id password hash. Roles nest:
``officer`` watches (live and recorded footage), ``dispatcher`` also sends
remote triggers, ``admin`` also manages accounts (:meth:`Role.includes`).
There is no default account: the first one is made with ``breakglass
receiver user add`` (or by the demo, which prints its random password once).

Passwords follow :func:`check_password` (at least 12 characters, not the
account's name, not a well-known password) and are hashed with argon2id at
:class:`PasswordParams` (RFC 9106's second recommended setting by default).
A successful login whose hash was made with other parameters is rehashed on
the spot, so raising the cost reaches every account at its next login.

:meth:`AccountStore.authenticate` is the one place a password is checked. An
empty password is refused at once, for every name, uncounted. Otherwise the
attempt is counted against the *name and the client address* (an IPv4
address, or an IPv6 /64: :func:`address_key`) before the password is checked
(so attempts sent at once cannot check more passwords than allowed), and the
count is cleared when the password turns out right (:class:`LockoutPolicy`):

- ``max_failures`` failures of one name from one address lock that name *for
  that address* for ``lockout_s``: its attempts there are refused without a
  check. The same name from any other address is unaffected, so nobody can
  lock an officer out by guessing at their name from somewhere else;
- once a name has had ``name_failures`` failures from all addresses within
  ``lockout_s``, an address that failed for it lately gets at most one check
  per ``name_interval_s`` among all such addresses (a global rate across
  addresses). An address without a recent failure for the name is never held
  back: the right password from there always logs in.

The counts live in the database (tables ``login_failures`` and
``login_names``), so a restart does not reset them and ``breakglass receiver
user unlock`` (another process) clears a name's at once. Names that have no
account are counted exactly the same way, in the same tables, and a password
given for one is checked against a dummy hash made with the same parameters:
neither the answer, the time nor the locking tells which names exist.

Login sessions live in the same file, so that ``breakglass receiver user
disable`` (another process) ends an officer's sessions at once. A session id
is 256 random bits, given to the browser only; the table keeps its SHA-256.
A session ends at logout, after ``idle_timeout_s`` without a request, after
``lifetime_s`` in any case, and whenever its account is disabled or its
password changed (:class:`SessionPolicy`). Both bump the account's
``generation``; :meth:`AccountStore.create_session` is given the generation
the password was checked against and refuses (:class:`CredentialsChangedError`)
if it changed meanwhile, so a login whose check was under way during a
password reset gets no session. Its role is read from the account
on every lookup, so a role change applies at the next request.

The file is created with mode 0600 and used in WAL mode. Every method is
synchronous and thread-safe (one connection behind a lock; the slow argon2
work runs outside it): the server calls them from worker threads
(:mod:`receiver.auth`), the command line directly. Time is the injected
``clock`` (wall seconds).
"""

from __future__ import annotations

import enum
import hashlib
import math
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError

from agent.connection_slots import address_group
from receiver.errors import ReceiverError

__all__ = [
    "AccountError",
    "AccountExistsError",
    "AccountInfo",
    "AccountStore",
    "CredentialsChangedError",
    "InvalidNameError",
    "LastAdminError",
    "LockoutPolicy",
    "LoginOutcome",
    "LoginResult",
    "NewSession",
    "PasswordParams",
    "PasswordPolicyError",
    "Role",
    "SessionInfo",
    "SessionPolicy",
    "UnknownAccountError",
    "address_key",
    "check_password",
    "validate_name",
]

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
#: How much of an attempted name its failure count is kept under (longer ones are no name).
_NAME_KEY = 64
MIN_PASSWORD = 12
MAX_PASSWORD = 1024
#: A few of the most common passwords of 12 characters or more (breach corpora).
_COMMON = """
    123456789012 1234567890123 12345678901234 123123123123 111111111111 000000000000
    password1234 password12345 password123456 passwordpassword qwertyuiopas qwertyuiop123
    qwerty123456 1q2w3e4r5t6y 1qaz2wsx3edc iloveyou1234 abcdefghijkl abc123abc123 letmein12345
    welcome12345 administrator changeme1234 breakglass123 breakglass1234 policepolice
    correcthorsebatterystaple
"""
COMMON_PASSWORDS = frozenset(_COMMON.split())


class AccountError(ReceiverError):
    """Base of the account errors."""

    code = "account_error"


class InvalidNameError(AccountError, ValueError):
    """An account name is not 1-64 of ``a-z 0-9 . _ -`` starting with a letter or digit."""

    code = "invalid_name"


class PasswordPolicyError(AccountError, ValueError):
    """A new password breaks the policy (the message says which rule)."""

    code = "weak_password"


class AccountExistsError(AccountError, ValueError):
    """An account with this name exists already."""

    code = "account_exists"


class UnknownAccountError(AccountError, LookupError):
    """No account has this name."""

    code = "unknown_account"


class CredentialsChangedError(AccountError):
    """The password was changed, or the account disabled, while a login was being checked:
    the password that login gave is no longer the account's, so it gets no session."""

    code = "invalid_credentials"


class LastAdminError(AccountError):
    """The change would leave no enabled admin account (nobody could manage accounts)."""

    code = "last_admin"


class Role(enum.StrEnum):
    """What an account may do; each role includes the ones before it."""

    OFFICER = "officer"
    DISPATCHER = "dispatcher"
    ADMIN = "admin"

    def includes(self, other: Role) -> bool:
        """Whether this role may do everything ``other`` may."""
        return _RANK[self] >= _RANK[other]


_RANK = {Role.OFFICER: 1, Role.DISPATCHER: 2, Role.ADMIN: 3}


@dataclass(frozen=True, slots=True)
class PasswordParams:
    """argon2id cost. The default is RFC 9106's second recommendation (64 MiB, 3 passes)."""

    time_cost: int = 3
    memory_cost_kib: int = 64 * 1024
    parallelism: int = 4
    hash_len: int = 32
    salt_len: int = 16

    def hasher(self) -> PasswordHasher:
        """The argon2-cffi hasher for these parameters (type argon2id)."""
        return PasswordHasher(
            time_cost=self.time_cost,
            memory_cost=self.memory_cost_kib,
            parallelism=self.parallelism,
            hash_len=self.hash_len,
            salt_len=self.salt_len,
            type=Type.ID,
        )


@dataclass(frozen=True, slots=True)
class LockoutPolicy:
    """What failed logins hold back: a name from one address, and a name from all of them.

    An address is an IPv4 address or an IPv6 /64 (:func:`address_key`).
    """

    #: Failures of one name from one address (each within ``lockout_s`` of the one
    #: before, with no success between) that lock the name *for that address*.
    max_failures: int = 5
    #: How long such a lock lasts, and how long a failure counts.
    lockout_s: float = 15 * 60.0
    #: Failures of one name from all addresses within a ``lockout_s`` window after which
    #: the addresses that failed for it lately share one check per ``name_interval_s``
    #: (an address with no recent failure for the name is never held back).
    name_failures: int = 10
    name_interval_s: float = 30.0
    #: Name and address pairs tracked at most (the oldest failures are forgotten first).
    max_tracked: int = 100_000


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    """How long a login session lasts."""

    #: Ended after this long without a request (the viewer polls every few seconds).
    idle_timeout_s: float = 30 * 60.0
    #: Ended this long after the login in any case (one shift).
    lifetime_s: float = 12 * 3600.0
    #: ``last_seen`` is written at most this often per session (idle time granularity).
    touch_every_s: float = 30.0


@dataclass(frozen=True, slots=True)
class AccountInfo:
    """An account as listed (no hash)."""

    name: str
    role: Role
    disabled: bool
    created: float
    password_changed: float
    last_login: float | None
    #: Failed logins of the name from all addresses in the current ``lockout_s`` window.
    failures: int
    #: When the last lock of the name at some address ends (0: never locked).
    locked_until: float
    #: When the account last lost rights (disabled, or its role changed to one that
    #: does not include the old): player links issued before are dead for good.
    rights_lost: float = 0.0
    #: How many addresses the name is locked for now.
    locked_addresses: int = 0

    def to_json(self, now: float) -> dict[str, object]:
        """The ``GET /v1/users`` entry."""
        return {
            "name": self.name,
            "role": str(self.role),
            "disabled": self.disabled,
            "locked": self.locked_until > now,
            "locked_until": self.locked_until if self.locked_until > now else None,
            "locked_addresses": self.locked_addresses if self.locked_until > now else 0,
            "created": self.created,
            "password_changed": self.password_changed,
            "last_login": self.last_login,
        }


class LoginOutcome(enum.StrEnum):
    """What a login attempt came to."""

    OK = "ok"
    #: Wrong password, or no such account (the caller cannot tell which).
    INVALID = "invalid_credentials"
    #: The right password for a disabled account (answered like ``INVALID``).
    DISABLED = "disabled"
    #: The name is locked for this address after too many failures from it; the
    #: password was not checked.
    LOCKED = "locked"
    #: The name has had many failures from everywhere and this address failed for it
    #: lately: not checked now, try after ``locked_until`` (answered like ``LOCKED``).
    THROTTLED = "throttled"


@dataclass(frozen=True, slots=True)
class LoginResult:
    """The outcome of :meth:`AccountStore.authenticate`."""

    outcome: LoginOutcome
    #: The account's role when it exists (for the audit entry), else None.
    role: Role | None = None
    #: When the lock ends (wall seconds), for ``LOCKED`` and for a failure that locked it;
    #: when a check may be tried again, for ``THROTTLED``.
    locked_until: float | None = None
    #: This failure started a lockout (of the name, for this address).
    locked_now: bool = False
    #: The stored hash was replaced by one with the current parameters.
    rehashed: bool = False
    #: For ``OK``: the account's generation the password was checked against (give it to
    #: :meth:`AccountStore.create_session` or :meth:`AccountStore.set_password`).
    generation: int | None = None


@dataclass(frozen=True, slots=True)
class NewSession:
    """A session just created: the secret id (cookie) and its CSRF token."""

    token: str
    csrf: str
    #: A short public handle of the session (audit entries name it, never the token).
    handle: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """A live session, as looked up from its cookie."""

    name: str
    role: Role
    csrf: str
    handle: str
    created: float


def validate_name(name: str) -> str:
    """``name`` if it is a valid account name; else :class:`InvalidNameError`."""
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise InvalidNameError(
            f"account name {name!r:.70}: expected 1-64 of a-z 0-9 . _ - "
            "(starting with a letter or digit)"
        )
    return name


def check_password(password: str, name: str) -> None:
    """Raise :class:`PasswordPolicyError` unless ``password`` is acceptable for ``name``."""
    if not isinstance(password, str):
        raise PasswordPolicyError("the password must be text")
    if len(password) < MIN_PASSWORD:
        raise PasswordPolicyError(f"the password must be at least {MIN_PASSWORD} characters long")
    if len(password) > MAX_PASSWORD:
        raise PasswordPolicyError(f"the password must be at most {MAX_PASSWORD} characters long")
    folded = password.casefold()
    if name and name.casefold() in folded:
        raise PasswordPolicyError("the password must not contain the account name")
    if len(set(folded)) < 4 or folded.replace(" ", "") in COMMON_PASSWORDS:
        raise PasswordPolicyError("the password is too common; choose another")


def address_key(remote: str | None) -> str:
    """The client address as login failures are counted per: an IPv4 address as it is,
    an IPv6 address as its /64 (one subscriber's prefix holds 2^64 addresses), an
    IPv4-mapped IPv6 address as the IPv4 address; anything else as given (at most 64
    characters), and no address at all as ``-``. The connection caps' groups too
    (:func:`agent.connection_slots.address_group`, which this is)."""
    return address_group(remote or "")


def session_handle(token_hash: str) -> str:
    """The public handle of a session: 16 hex digits of its stored hash."""
    return token_hash[:16]


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("ascii", "replace")).hexdigest()


_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    hash TEXT NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    password_changed REAL NOT NULL,
    last_login REAL,
    failures INTEGER NOT NULL DEFAULT 0,  -- unused since failures are counted per address
    locked_until REAL NOT NULL DEFAULT 0,  -- unused likewise
    rights_lost REAL NOT NULL DEFAULT 0,
    generation INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS sessions (
    token_hash TEXT PRIMARY KEY,
    name TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    csrf TEXT NOT NULL,
    created REAL NOT NULL,
    last_seen REAL NOT NULL,
    remote TEXT
);
CREATE INDEX IF NOT EXISTS sessions_by_name ON sessions(name);
CREATE TABLE IF NOT EXISTS login_failures (
    name TEXT NOT NULL,
    source TEXT NOT NULL,
    failures INTEGER NOT NULL,
    last_failure REAL NOT NULL,
    locked_until REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (name, source)
);
CREATE INDEX IF NOT EXISTS login_failures_by_time ON login_failures(last_failure);
CREATE TABLE IF NOT EXISTS login_names (
    name TEXT PRIMARY KEY,
    window_start REAL NOT NULL,
    failures INTEGER NOT NULL,
    next_check REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS login_names_by_time ON login_names(window_start);
"""
#: Every this many attempts, stale failure records are dropped (and the table trimmed).
_PRUNE_EVERY = 64
_USER_COLUMNS = (
    "u.name, u.role, u.disabled, u.created, u.password_changed, u.last_login, "
    "COALESCE((SELECT n.failures FROM login_names n WHERE n.name = u.name "
    "AND n.window_start > ?), 0), "
    "COALESCE((SELECT MAX(f.locked_until) FROM login_failures f WHERE f.name = u.name), 0), "
    "u.rights_lost, "
    "(SELECT COUNT(*) FROM login_failures f WHERE f.name = u.name AND f.locked_until > ?)"
)


class AccountStore:
    """Accounts and login sessions in ``path`` (SQLite, WAL, mode 0600).

    Use as a context manager, or :meth:`open` then :meth:`close`.
    """

    def __init__(
        self,
        path: Path,
        *,
        params: PasswordParams | None = None,
        lockout: LockoutPolicy | None = None,
        sessions: SessionPolicy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.params = params or PasswordParams()
        self.lockout = lockout or LockoutPolicy()
        self.session_policy = sessions or SessionPolicy()
        self.clock = clock
        self._hasher = self.params.hasher()
        self._dummy_hash: str | None = None
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._attempts = 0  # login attempts admitted, for pruning (under the lock)

    # -- lifecycle -----------------------------------------------------------

    def open(self) -> AccountStore:
        """Create (mode 0600) or open the database."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # SQLite gives its -wal and -shm files the database file's mode.
        os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        if os.stat(self.path).st_mode & 0o077:
            os.chmod(self.path, 0o600)
        db = sqlite3.connect(self.path, timeout=5.0, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            db.executescript(_SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(users)")}
            if "rights_lost" not in columns:  # a database made before the column existed
                db.execute("ALTER TABLE users ADD COLUMN rights_lost REAL NOT NULL DEFAULT 0")
            if "generation" not in columns:  # likewise
                db.execute("ALTER TABLE users ADD COLUMN generation INTEGER NOT NULL DEFAULT 0")
        except BaseException:
            db.close()
            raise
        self._db = db
        return self

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> AccountStore:
        return self.open()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, under the lock."""
        with self._lock:
            if self._db is None:
                raise RuntimeError("the account store is not open")
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[Any]:
        with self._lock:
            if self._db is None:
                raise RuntimeError("the account store is not open")
            return list(self._db.execute(sql, args))

    # -- accounts ------------------------------------------------------------

    def add(self, name: str, role: Role, password: str) -> AccountInfo:
        """Create an account; :class:`AccountExistsError` if the name is taken."""
        validate_name(name)
        role = Role(role)
        check_password(password, name)
        digest = self._hasher.hash(password)
        now = self.clock()
        try:
            with self._tx() as db:
                db.execute(
                    "INSERT INTO users(name, role, hash, created, password_changed) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (name, str(role), digest, now, now),
                )
        except sqlite3.IntegrityError:
            raise AccountExistsError(f"account {name!r} exists already") from None
        return self.get(name)

    def get(self, name: str) -> AccountInfo:
        """The account ``name``; :class:`UnknownAccountError` if there is none."""
        now = self.clock()
        rows = self._query(
            f"SELECT {_USER_COLUMNS} FROM users u WHERE u.name = ?",  # noqa: S608 (constant)
            (now - self.lockout.lockout_s, now, name),
        )
        if not rows:
            raise UnknownAccountError(f"no account {name!r:.70}")
        return _info(rows[0])

    def accounts(self) -> list[AccountInfo]:
        """Every account, by name."""
        now = self.clock()
        rows = self._query(
            f"SELECT {_USER_COLUMNS} FROM users u ORDER BY u.name",  # noqa: S608 (constant)
            (now - self.lockout.lockout_s, now),
        )
        return [_info(r) for r in rows]

    def count(self) -> int:
        """How many accounts exist."""
        (row,) = self._query("SELECT COUNT(*) FROM users")
        return int(row[0])

    def set_password(self, name: str, password: str, *, generation: int | None = None) -> None:
        """Replace the password; ends every session of the account and clears its locks.

        ``generation``: the one a check of the current password returned
        (:attr:`LoginResult.generation`); :class:`CredentialsChangedError` if the password
        was changed (or the account disabled) since, and nothing is changed.
        """
        check_password(password, validate_name(name))
        digest = self._hasher.hash(password)
        with self._tx() as db:
            row = db.execute("SELECT generation FROM users WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise UnknownAccountError(f"no account {name!r:.70}")
            if generation is not None and int(row[0]) != generation:
                raise CredentialsChangedError(
                    f"the password of {name!r:.70} was changed meanwhile: nothing done"
                )
            db.execute(
                "UPDATE users SET hash = ?, password_changed = ?, generation = generation + 1 "
                "WHERE name = ?",
                (digest, self.clock(), name),
            )
            db.execute("DELETE FROM sessions WHERE name = ?", (name,))
            _clear_failures(db, name)

    def unlock(self, name: str) -> int:
        """Clear the failure counts and locks of account ``name`` at every address (and
        its throttle); how many addresses it was locked for. :class:`UnknownAccountError`
        if there is no such account."""
        now = self.clock()
        with self._tx() as db:
            if db.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone() is None:
                raise UnknownAccountError(f"no account {name!r:.70}")
            (locked,) = db.execute(
                "SELECT COUNT(*) FROM login_failures WHERE name = ? AND locked_until > ?",
                (name, now),
            ).fetchone()
            _clear_failures(db, name)
        return int(locked)

    def set_disabled(self, name: str, disabled: bool, *, keep_admin: bool = False) -> None:
        """Disable (ending every session and player link for good) or enable an account.

        ``keep_admin``: :class:`LastAdminError` rather than disable the last enabled admin.
        """
        with self._tx() as db:
            if disabled and keep_admin:
                _keep_an_admin(db, name)
            if disabled:
                cur = db.execute(
                    "UPDATE users SET disabled = 1, rights_lost = ?, generation = generation + 1 "
                    "WHERE name = ?",
                    (self.clock(), name),
                )
            else:
                cur = db.execute("UPDATE users SET disabled = 0 WHERE name = ?", (name,))
            if cur.rowcount == 0:
                raise UnknownAccountError(f"no account {name!r:.70}")
            if disabled:
                db.execute("DELETE FROM sessions WHERE name = ?", (name,))

    def set_role(self, name: str, role: Role, *, keep_admin: bool = False) -> None:
        """Change an account's role (its sessions get the new role at their next request;
        a role that does not include the old one ends its player links for good).

        ``keep_admin``: :class:`LastAdminError` rather than demote the last enabled admin.
        """
        role = Role(role)
        with self._tx() as db:
            old = db.execute("SELECT role FROM users WHERE name = ?", (name,)).fetchone()
            if old is None:
                raise UnknownAccountError(f"no account {name!r:.70}")
            if keep_admin and role is not Role.ADMIN:
                _keep_an_admin(db, name)
            lost = not role.includes(Role(str(old[0])))
            db.execute(
                "UPDATE users SET role = ?, rights_lost = CASE WHEN ? THEN ? ELSE rights_lost END "
                "WHERE name = ?",
                (str(role), lost, self.clock(), name),
            )

    # -- login ---------------------------------------------------------------

    def authenticate(
        self, name: str, password: str, *, remote: str | None = None, login: bool = True
    ) -> LoginResult:
        """Check a login attempt from client address ``remote`` (slow: one argon2id
        verification, unless the attempt is held back or the password is empty).

        ``login=False``: a password confirmed for another purpose (a password change):
        counted and locked alike, but ``last_login`` stays.
        """
        if not password:  # never anyone's: refused alike for every name, uncounted
            return LoginResult(LoginOutcome.INVALID)
        key, source = name[:_NAME_KEY], address_key(remote)
        valid = _NAME.fullmatch(name) is not None and len(password) <= MAX_PASSWORD
        row = (
            self._query(
                "SELECT hash, role, disabled, generation FROM users WHERE name = ?", (name,)
            )
            if valid
            else []
        )
        role = Role(str(row[0][1])) if row else None
        held = self._admit(key, source, role, self.clock())
        if held is not None:
            return held
        # An unknown name costs the same verification, against a hash of nobody's password.
        digest = str(row[0][0]) if row else self._dummy()
        try:
            right = self._hasher.verify(digest, password[:MAX_PASSWORD]) and bool(row)
        except (VerificationError, InvalidHashError):
            right = False
        if not right or row[0][2]:
            return self._failed(key, source, role, disabled=right)
        generation = int(row[0][3])
        with self._tx() as db:
            db.execute(
                "UPDATE users SET last_login = CASE WHEN ? THEN ? ELSE last_login END "
                "WHERE name = ?",
                (login, self.clock(), name),
            )
            # This address is clean again; the name's count across addresses keeps the
            # others' failures (it only gives back the one this attempt was counted as).
            db.execute("DELETE FROM login_failures WHERE name = ? AND source = ?", (key, source))
            db.execute(
                "UPDATE login_names SET failures = MAX(failures - 1, 0) WHERE name = ?", (key,)
            )
        rehashed = False
        if self._hasher.check_needs_rehash(digest):
            fresh = self._hasher.hash(password)
            with self._tx() as db:
                db.execute(
                    "UPDATE users SET hash = ? WHERE name = ? AND hash = ?", (fresh, name, digest)
                )
            rehashed = True
        return LoginResult(LoginOutcome.OK, role, rehashed=rehashed, generation=generation)

    def _admit(self, key: str, source: str, role: Role | None, now: float) -> LoginResult | None:
        """None if the password may be checked now (the attempt is then counted as a
        failure until it succeeds); else the refusal (``LOCKED`` or ``THROTTLED``)."""
        policy = self.lockout
        with self._tx() as db:
            pair = db.execute(
                "SELECT failures, last_failure, locked_until FROM login_failures "
                "WHERE name = ? AND source = ?",
                (key, source),
            ).fetchone()
            failures, last, until = (
                (int(pair[0]), float(pair[1]), float(pair[2])) if pair else (0, 0.0, 0.0)
            )
            if until > now:
                return LoginResult(LoginOutcome.LOCKED, role, locked_until=until)
            if last <= now - policy.lockout_s:
                failures = 0  # the last failure from here is too old to count
            if failures >= policy.max_failures:  # that many checks from here are under way
                return LoginResult(LoginOutcome.THROTTLED, role, locked_until=now + 1.0)
            named = db.execute(
                "SELECT window_start, failures, next_check FROM login_names WHERE name = ?",
                (key,),
            ).fetchone()
            start, heat, next_check = (
                (float(named[0]), int(named[1]), float(named[2])) if named else (now, 0, 0.0)
            )
            if not start <= now < start + policy.lockout_s:
                start, heat = now, 0
            if failures and heat >= policy.name_failures:
                # Many failures of this name from everywhere, and this address is one that
                # failed for it lately: such addresses share one check per interval.
                if next_check > now:
                    return LoginResult(LoginOutcome.THROTTLED, role, locked_until=next_check)
                next_check = now + policy.name_interval_s
            db.execute(
                "INSERT INTO login_failures(name, source, failures, last_failure, locked_until) "
                "VALUES (?, ?, ?, ?, 0) ON CONFLICT(name, source) DO UPDATE SET "
                "failures = excluded.failures, last_failure = excluded.last_failure, "
                "locked_until = 0",
                (key, source, failures + 1, now),
            )
            db.execute(
                "INSERT INTO login_names(name, window_start, failures, next_check) "
                "VALUES (?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                "window_start = excluded.window_start, failures = excluded.failures, "
                "next_check = excluded.next_check",
                (key, start, heat + 1, next_check),
            )
            self._attempts += 1
            if self._attempts % _PRUNE_EVERY == 0:
                self._prune(db, now)
        return None

    def _failed(self, key: str, source: str, role: Role | None, *, disabled: bool) -> LoginResult:
        """A checked password was wrong (or right for a disabled account): the attempt stays
        counted; lock the name for this address if it was the ``max_failures``-th."""
        policy = self.lockout
        outcome = LoginOutcome.DISABLED if disabled else LoginOutcome.INVALID
        now = self.clock()
        with self._tx() as db:
            pair = db.execute(
                "SELECT failures FROM login_failures WHERE name = ? AND source = ?",
                (key, source),
            ).fetchone()
            if pair is not None and int(pair[0]) >= policy.max_failures:
                until = now + policy.lockout_s
                db.execute(
                    "UPDATE login_failures SET failures = 0, last_failure = ?, locked_until = ? "
                    "WHERE name = ? AND source = ?",
                    (now, until, key, source),
                )
                return LoginResult(outcome, role, locked_until=until, locked_now=True)
            db.execute(
                "UPDATE login_failures SET last_failure = MAX(last_failure, ?) "
                "WHERE name = ? AND source = ?",
                (now, key, source),
            )
        return LoginResult(outcome, role)

    def _prune(self, db: sqlite3.Connection, now: float) -> None:
        """Forget failures too old to count, then the oldest beyond ``max_tracked``."""
        policy = self.lockout
        old = now - policy.lockout_s
        db.execute(
            "DELETE FROM login_failures WHERE last_failure <= ? AND locked_until <= ?", (old, now)
        )
        db.execute(
            "DELETE FROM login_names WHERE window_start <= ? AND next_check <= ?", (old, now)
        )
        for table, column in (("login_failures", "last_failure"), ("login_names", "window_start")):
            (count,) = db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()  # noqa: S608
            if count > policy.max_tracked:
                db.execute(
                    f"DELETE FROM {table} WHERE rowid IN "  # noqa: S608 (constant names)
                    f"(SELECT rowid FROM {table} ORDER BY {column} LIMIT ?)",
                    (count - policy.max_tracked,),
                )

    def _dummy(self) -> str:
        if self._dummy_hash is None:
            self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(24))
        return self._dummy_hash

    def warm_up(self) -> None:
        """Make the dummy hash now, so the first unknown name costs what every one does."""
        self._dummy()

    # -- sessions ------------------------------------------------------------

    def create_session(
        self, name: str, remote: str | None = None, *, generation: int | None = None
    ) -> NewSession:
        """A new session for ``name`` (after a successful :meth:`authenticate`).

        ``generation``: the one that check returned (:attr:`LoginResult.generation`);
        :class:`CredentialsChangedError` if the password was changed or the account
        disabled since (checked in the same transaction as the insert).
        """
        token = secrets.token_urlsafe(32)  # 256 bits
        token_hash = _hash_token(token)
        csrf = secrets.token_urlsafe(32)
        now = self.clock()
        policy = self.session_policy
        with self._tx() as db:
            if generation is not None:
                row = db.execute(
                    "SELECT generation, disabled FROM users WHERE name = ?", (name,)
                ).fetchone()
                if row is None or int(row[0]) != generation or row[1]:
                    raise CredentialsChangedError(
                        f"the password of {name!r:.70} changed during the login: no session"
                    )
            db.execute(
                "DELETE FROM sessions WHERE last_seen < ? OR created < ?",
                (now - policy.idle_timeout_s, now - policy.lifetime_s),
            )
            db.execute(
                "INSERT INTO sessions(token_hash, name, csrf, created, last_seen, remote) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (token_hash, name, csrf, now, now, remote),
            )
        return NewSession(token, csrf, session_handle(token_hash), now + policy.lifetime_s)

    def lookup_session(self, token: str) -> SessionInfo | None:
        """The live session of ``token`` (its last use noted), or None."""
        if not token or len(token) > 128:
            return None
        token_hash = _hash_token(token)
        rows = self._query(
            "SELECT s.name, u.role, s.csrf, s.created, s.last_seen, u.disabled "
            "FROM sessions s JOIN users u ON u.name = s.name WHERE s.token_hash = ?",
            (token_hash,),
        )
        if not rows:
            return None
        name, role, csrf, created, last_seen, disabled = rows[0]
        now = self.clock()
        policy = self.session_policy
        created_f, seen_f = float(created), float(last_seen)
        if (
            disabled
            or now - seen_f >= policy.idle_timeout_s
            or now - created_f >= policy.lifetime_s
            or not math.isfinite(now)
        ):
            self.end_session(token)
            return None
        if now - seen_f >= policy.touch_every_s:
            with self._tx() as db:
                db.execute(
                    "UPDATE sessions SET last_seen = ? WHERE token_hash = ?", (now, token_hash)
                )
        return SessionInfo(
            str(name), Role(str(role)), str(csrf), session_handle(token_hash), created_f
        )

    def end_session(self, token: str) -> bool:
        """End the session of ``token``; whether there was one."""
        with self._tx() as db:
            cur = db.execute("DELETE FROM sessions WHERE token_hash = ?", (_hash_token(token),))
            return cur.rowcount > 0

    def session_count(self, name: str) -> int:
        """How many sessions of ``name`` are stored (expired ones included until purged)."""
        (row,) = self._query("SELECT COUNT(*) FROM sessions WHERE name = ?", (name,))
        return int(row[0])


def _keep_an_admin(db: sqlite3.Connection, name: str) -> None:
    """:class:`LastAdminError` if ``name`` is the only enabled admin (inside a transaction)."""
    (others,) = db.execute(
        "SELECT COUNT(*) FROM users WHERE role = ? AND disabled = 0 AND name != ?",
        (str(Role.ADMIN), name),
    ).fetchone()
    (target,) = db.execute(
        "SELECT COUNT(*) FROM users WHERE name = ? AND role = ? AND disabled = 0",
        (name, str(Role.ADMIN)),
    ).fetchone()
    if target and not others:
        raise LastAdminError(f"{name!r:.70} is the last enabled admin; make another admin first")


def _clear_failures(db: sqlite3.Connection, name: str) -> None:
    """Forget the failure counts and locks of ``name`` (inside a transaction)."""
    db.execute("DELETE FROM login_failures WHERE name = ?", (name,))
    db.execute("DELETE FROM login_names WHERE name = ?", (name,))


def _info(row: Any) -> AccountInfo:
    name, role, disabled, created, changed, last_login, failures, locked_until, lost, n = row
    return AccountInfo(
        name=str(name),
        role=Role(str(role)),
        disabled=bool(disabled),
        created=float(created),
        password_changed=float(changed),
        last_login=None if last_login is None else float(last_login),
        failures=int(failures),
        locked_until=float(locked_until),
        rights_lost=float(lost),
        locked_addresses=int(n),
    )
