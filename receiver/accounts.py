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

:meth:`AccountStore.authenticate` is the one place a password is checked. It
counts consecutive failures per name and locks the name for ``lockout_s``
after ``max_failures`` (:class:`LockoutPolicy`). Names that have no account
are counted too, in memory, and a password given for one is checked against
a dummy hash made with the same parameters: an unknown name costs the same
time and locks the same way as a known one, so neither tells which names
exist. A locked name is refused without checking the password.

Login sessions live in the same file, so that ``breakglass receiver user
disable`` (another process) ends an officer's sessions at once. A session id
is 256 random bits, given to the browser only; the table keeps its SHA-256.
A session ends at logout, after ``idle_timeout_s`` without a request, after
``lifetime_s`` in any case, and whenever its account is disabled or its
password changed (:class:`SessionPolicy`). Its role is read from the account
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
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError

from receiver.errors import ReceiverError

__all__ = [
    "AccountError",
    "AccountExistsError",
    "AccountInfo",
    "AccountStore",
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
    "check_password",
    "validate_name",
]

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
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
    """Consecutive failed logins of one name before it is locked, and for how long."""

    max_failures: int = 5
    lockout_s: float = 15 * 60.0
    #: How many names without an account are tracked in memory (oldest dropped first).
    max_unknown_names: int = 10_000


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
    failures: int
    locked_until: float
    #: When the account last lost rights (disabled, or its role changed to one that
    #: does not include the old): player links issued before are dead for good.
    rights_lost: float = 0.0

    def to_json(self, now: float) -> dict[str, object]:
        """The ``GET /v1/users`` entry."""
        return {
            "name": self.name,
            "role": str(self.role),
            "disabled": self.disabled,
            "locked": self.locked_until > now,
            "locked_until": self.locked_until if self.locked_until > now else None,
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
    #: The name is locked after too many failures; the password was not checked.
    LOCKED = "locked"


@dataclass(frozen=True, slots=True)
class LoginResult:
    """The outcome of :meth:`AccountStore.authenticate`."""

    outcome: LoginOutcome
    #: The account's role when it exists (for the audit entry), else None.
    role: Role | None = None
    #: When the lock ends (wall seconds), for ``LOCKED`` and for a failure that locked it.
    locked_until: float | None = None
    #: This failure started a lockout.
    locked_now: bool = False
    #: The stored hash was replaced by one with the current parameters.
    rehashed: bool = False


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
    failures INTEGER NOT NULL DEFAULT 0,
    locked_until REAL NOT NULL DEFAULT 0,
    rights_lost REAL NOT NULL DEFAULT 0
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
"""


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
        # Failures of names without an account: name -> (failures, locked_until).
        self._unknown: OrderedDict[str, tuple[int, float]] = OrderedDict()

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
        rows = self._query(
            "SELECT name, role, disabled, created, password_changed, last_login, failures, "
            "locked_until, rights_lost FROM users WHERE name = ?",
            (name,),
        )
        if not rows:
            raise UnknownAccountError(f"no account {name!r:.70}")
        return _info(rows[0])

    def accounts(self) -> list[AccountInfo]:
        """Every account, by name."""
        rows = self._query(
            "SELECT name, role, disabled, created, password_changed, last_login, failures, "
            "locked_until, rights_lost FROM users ORDER BY name"
        )
        return [_info(r) for r in rows]

    def count(self) -> int:
        """How many accounts exist."""
        (row,) = self._query("SELECT COUNT(*) FROM users")
        return int(row[0])

    def set_password(self, name: str, password: str) -> None:
        """Replace the password; ends every session of the account and clears its lock."""
        check_password(password, validate_name(name))
        digest = self._hasher.hash(password)
        with self._tx() as db:
            cur = db.execute(
                "UPDATE users SET hash = ?, password_changed = ?, failures = 0, locked_until = 0 "
                "WHERE name = ?",
                (digest, self.clock(), name),
            )
            if cur.rowcount == 0:
                raise UnknownAccountError(f"no account {name!r:.70}")
            db.execute("DELETE FROM sessions WHERE name = ?", (name,))

    def set_disabled(self, name: str, disabled: bool, *, keep_admin: bool = False) -> None:
        """Disable (ending every session and player link for good) or enable an account.

        ``keep_admin``: :class:`LastAdminError` rather than disable the last enabled admin.
        """
        with self._tx() as db:
            if disabled and keep_admin:
                _keep_an_admin(db, name)
            if disabled:
                cur = db.execute(
                    "UPDATE users SET disabled = 1, rights_lost = ? WHERE name = ?",
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

    def authenticate(self, name: str, password: str, *, login: bool = True) -> LoginResult:
        """Check a login attempt (slow: one argon2id verification, unless locked).

        ``login=False``: a password confirmed for another purpose (a password change):
        counted and locked alike, but ``last_login`` stays.
        """
        now = self.clock()
        known = _NAME.fullmatch(name) is not None and 0 < len(password) <= MAX_PASSWORD
        row = (
            self._query(
                "SELECT hash, role, disabled, locked_until FROM users WHERE name = ?", (name,)
            )
            if known
            else []
        )
        if not row:
            return self._authenticate_unknown(name, password, now)
        digest, role_text, disabled, locked_until = row[0]
        role = Role(str(role_text))
        if float(locked_until) > now:
            return LoginResult(LoginOutcome.LOCKED, role, locked_until=float(locked_until))
        try:
            self._hasher.verify(str(digest), password)
        except (VerificationError, InvalidHashError):
            return self._failed(name, role, now)
        if disabled:
            return LoginResult(LoginOutcome.DISABLED, role)
        rehashed = False
        with self._tx() as db:
            db.execute(
                "UPDATE users SET failures = 0, locked_until = 0, "
                "last_login = CASE WHEN ? THEN ? ELSE last_login END WHERE name = ?",
                (login, now, name),
            )
        if self._hasher.check_needs_rehash(str(digest)):
            fresh = self._hasher.hash(password)
            with self._tx() as db:
                db.execute(
                    "UPDATE users SET hash = ? WHERE name = ? AND hash = ?", (fresh, name, digest)
                )
            rehashed = True
        return LoginResult(LoginOutcome.OK, role, rehashed=rehashed)

    def _failed(self, name: str, role: Role, now: float) -> LoginResult:
        policy = self.lockout
        with self._tx() as db:
            (failures,) = db.execute(
                "UPDATE users SET failures = failures + 1 WHERE name = ? RETURNING failures",
                (name,),
            ).fetchone()
            if failures >= policy.max_failures:
                until = now + policy.lockout_s
                db.execute(
                    "UPDATE users SET failures = 0, locked_until = ? WHERE name = ?", (until, name)
                )
                return LoginResult(LoginOutcome.INVALID, role, locked_until=until, locked_now=True)
        return LoginResult(LoginOutcome.INVALID, role)

    def _authenticate_unknown(self, name: str, password: str, now: float) -> LoginResult:
        """No such account: the same work, the same counting, the same answers."""
        key = name[:64]
        with self._lock:
            failures, until = self._unknown.get(key, (0, 0.0))
        if until > now:
            return LoginResult(LoginOutcome.LOCKED, locked_until=until)
        with suppress(VerificationError, InvalidHashError):
            self._hasher.verify(self._dummy(), password[:MAX_PASSWORD] or "-")
        policy = self.lockout
        failures += 1
        locked_now = failures >= policy.max_failures
        until = now + policy.lockout_s if locked_now else 0.0
        with self._lock:
            self._unknown[key] = (0, until) if locked_now else (failures, 0.0)
            self._unknown.move_to_end(key)
            while len(self._unknown) > policy.max_unknown_names:
                self._unknown.popitem(last=False)
        return LoginResult(
            LoginOutcome.INVALID, locked_until=until if locked_now else None, locked_now=locked_now
        )

    def _dummy(self) -> str:
        if self._dummy_hash is None:
            self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(24))
        return self._dummy_hash

    def warm_up(self) -> None:
        """Make the dummy hash now, so the first unknown name costs what every one does."""
        self._dummy()

    # -- sessions ------------------------------------------------------------

    def create_session(self, name: str, remote: str | None = None) -> NewSession:
        """A new session for ``name`` (after a successful :meth:`authenticate`)."""
        token = secrets.token_urlsafe(32)  # 256 bits
        token_hash = _hash_token(token)
        csrf = secrets.token_urlsafe(32)
        now = self.clock()
        policy = self.session_policy
        with self._tx() as db:
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


def _info(row: Any) -> AccountInfo:
    name, role, disabled, created, changed, last_login, failures, locked_until, lost = row
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
    )
