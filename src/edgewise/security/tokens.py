"""Enrolment tokens and operator tokens, as pure logic (the store keeps them, the API asks).

A token is ``<prefix>_<43 url-safe characters>`` (32 random bytes): ``ewe_`` for enrolment
tokens, ``ewo_`` for operator tokens, so a token pasted in the wrong place is recognised. Only
its sha256 (hex) is ever stored; the plaintext is shown once, when it is made. 256 random bits
cannot be guessed, so a plain sha256 needs no salt or slow hash, and the store can find a token by
its hash with an index. The plaintext travels as a `pydantic.SecretStr`, whose ``repr`` and
``str`` are masked, so it does not end up in logs or tracebacks by accident.

Errors (HTTP status in brackets, for the API layer):

    PeerError ──┬─ TokenError (401)
                │   ├─ TokenInvalid      malformed, unknown or wrong kind of token
                │   ├─ TokenExpired      past its expiry
                │   └─ TokenUsedUp       an enrolment token with no uses left
                └─ Forbidden (403)       the token's role does not allow the call
    ConfigError                          bad labels, role name, ttl or number of uses
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import NamedTuple

from pydantic import SecretStr

from edgewise.errors import ConfigError, PeerError

ENROLMENT_PREFIX = "ewe"
OPERATOR_PREFIX = "ewo"
TOKEN_BYTES = 32
MAX_TOKEN_CHARS = 128  # longer input is rejected before it is hashed
DEFAULT_ENROLMENT_TTL = timedelta(hours=1)

_PREFIX = re.compile(r"[a-z]{2,8}")
_TOKEN = re.compile(r"([a-z]{2,8})_[A-Za-z0-9_-]{43}")
_HASH = re.compile(r"[0-9a-f]{64}")
_LABEL_KEY = re.compile(r"[a-z0-9]([a-z0-9._/-]{0,61}[a-z0-9])?")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?")


class TokenError(PeerError):
    """A token was refused. Answer 401."""

    status = 401


class TokenInvalid(TokenError):
    """The token is malformed, unknown, or of the wrong kind."""


class TokenExpired(TokenError):
    """The token's expiry has passed."""


class TokenUsedUp(TokenError):
    """The enrolment token has no uses left."""


class Forbidden(PeerError):
    """The caller is authenticated but not allowed to do this. Answer 403."""

    status = 403


class NewToken(NamedTuple):
    """A token just made: show ``plaintext.get_secret_value()`` once, store only ``hash``."""

    plaintext: SecretStr
    hash: str


def new_token(prefix: str = ENROLMENT_PREFIX) -> NewToken:
    """Make a token ``<prefix>_<32 random bytes, url-safe base64>`` and its sha256 hex hash."""
    if not _PREFIX.fullmatch(prefix):
        raise ValueError(f"token prefix must be 2-8 lower-case letters, got {prefix!r}")
    plaintext = f"{prefix}_{secrets.token_urlsafe(TOKEN_BYTES)}"
    return NewToken(SecretStr(plaintext), hash_token(plaintext))


def _reveal(plaintext: str | SecretStr) -> str:
    return plaintext.get_secret_value() if isinstance(plaintext, SecretStr) else plaintext


def hash_token(plaintext: str | SecretStr) -> str:
    """sha256 hex of a token's plaintext: what the store keeps and looks tokens up by."""
    return hashlib.sha256(_reveal(plaintext).encode("utf-8")).hexdigest()


def verify(plaintext: str | SecretStr, expected_hash: str) -> bool:
    """Whether ``plaintext`` hashes to ``expected_hash``, compared in constant time.

    False for anything that is not a string of at most `MAX_TOKEN_CHARS` characters.
    """
    text = _reveal(plaintext)
    if not isinstance(text, str) or len(text) > MAX_TOKEN_CHARS:
        return False
    if not isinstance(expected_hash, str):
        return False
    try:
        expected = expected_hash.lower().encode("ascii")
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(hash_token(text).encode("ascii"), expected)


def check_format(plaintext: str | SecretStr, prefix: str) -> str:
    """Hash of a well-formed token of kind ``prefix``; `TokenInvalid` (no secret in it) if not."""
    text = _reveal(plaintext)
    if not isinstance(text, str) or len(text) > MAX_TOKEN_CHARS:
        raise TokenInvalid("malformed token")
    m = _TOKEN.fullmatch(text)
    if m is None:
        raise TokenInvalid(f"malformed token (expected {prefix}_ followed by 43 characters)")
    if m.group(1) != prefix:
        raise TokenInvalid(f"wrong kind of token: {m.group(1)}_..., expected {prefix}_...")
    return hash_token(text)


def validate_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """Label keys: lower-case ``[a-z0-9._/-]``, 1-63 characters; values: up to 63 characters."""
    out: dict[str, str] = {}
    for key, value in labels.items():
        if not isinstance(key, str) or not _LABEL_KEY.fullmatch(key):
            raise ConfigError(
                f"invalid label key {key!r}: 1-63 characters of a-z, 0-9, '.', '_', '/', '-', "
                "starting and ending with a letter or digit"
            )
        if not isinstance(value, str) or not _LABEL_VALUE.fullmatch(value):
            raise ConfigError(
                f"invalid value {value!r} for label {key}: up to 63 characters of letters, "
                "digits, '.', '_', '-', starting and ending with a letter or digit"
            )
        out[key] = value
    return out


def _aware(t: datetime, what: str) -> datetime:
    if not isinstance(t, datetime) or t.tzinfo is None:
        raise ValueError(f"{what} must be a timezone-aware datetime (use datetime.now(UTC))")
    return t


def _check_hash(h: str) -> str:
    if not isinstance(h, str) or not _HASH.fullmatch(h):
        raise ValueError("token hash must be 64 lower-case hex characters (sha256)")
    return h


class Role(enum.StrEnum):
    """What an operator token may do: viewers read; operators and admins also change things;
    only admins manage tokens, revocations and the CA."""

    ADMIN = "admin"
    OPERATOR = "operator"
    VIEWER = "viewer"

    @property
    def can_mutate(self) -> bool:
        return self is not Role.VIEWER

    @property
    def can_administer(self) -> bool:
        return self is Role.ADMIN

    @classmethod
    def parse(cls, name: str) -> Role:
        try:
            return cls(name)
        except ValueError:
            choices = ", ".join(r.value for r in cls)
            raise ConfigError(f"unknown role {name!r}; choose one of {choices}") from None


@dataclass(frozen=True)
class EnrolmentToken:
    """The stored side of an enrolment token: its hash, the labels a node enrolled with it gets,
    its expiry and how many more nodes may use it.

    `check` and `consume` decide; the store must apply a use atomically (e.g. ``UPDATE ... SET
    uses_left = uses_left - 1 WHERE hash = ? AND uses_left > 0 AND expires_at > ?`` and check
    one row changed) so two nodes racing for a single-use token cannot both win.
    """

    hash: str
    labels: Mapping[str, str]
    expires_at: datetime
    uses_left: int

    def __post_init__(self) -> None:
        _check_hash(self.hash)
        _aware(self.expires_at, "expires_at")
        if not isinstance(self.uses_left, int) or self.uses_left < 0:
            raise ValueError(f"uses_left must be a non-negative integer, got {self.uses_left!r}")
        object.__setattr__(self, "labels", MappingProxyType(validate_labels(self.labels)))

    def __repr__(self) -> str:
        return (
            f"EnrolmentToken(hash={self.hash[:12]}…, labels={dict(self.labels)}, "
            f"expires_at={self.expires_at.isoformat()}, uses_left={self.uses_left})"
        )

    @classmethod
    def issue(
        cls,
        labels: Mapping[str, str] | None = None,
        ttl: timedelta = DEFAULT_ENROLMENT_TTL,
        uses: int = 1,
        *,
        now: datetime | None = None,
    ) -> tuple[SecretStr, EnrolmentToken]:
        """A new token: its plaintext (show once) and the record to store."""
        if ttl <= timedelta(0):
            raise ConfigError(f"token lifetime must be positive, got {ttl}")
        if not isinstance(uses, int) or uses < 1:
            raise ConfigError(f"a token needs at least one use, got {uses!r}")
        t = _aware(now, "now") if now is not None else datetime.now(UTC)
        token = new_token(ENROLMENT_PREFIX)
        return token.plaintext, cls(token.hash, dict(labels or {}), t + ttl, uses)

    def check(self, now: datetime) -> None:
        """Raise `TokenExpired` or `TokenUsedUp` unless the token may enrol a node at ``now``."""
        if _aware(now, "now") >= self.expires_at:
            raise TokenExpired(
                f"enrolment token expired at {self.expires_at:%Y-%m-%d %H:%M:%S %Z}; "
                "create a new one with `edgewise cloud token create`"
            )
        if self.uses_left <= 0:
            raise TokenUsedUp(
                "enrolment token has been used up; create a new one with "
                "`edgewise cloud token create`"
            )

    def consume(self, now: datetime) -> EnrolmentToken:
        """`check`, then the token with one use fewer."""
        self.check(now)
        return replace(self, labels=dict(self.labels), uses_left=self.uses_left - 1)


@dataclass(frozen=True)
class OperatorToken:
    """The stored side of an operator token: hash, a name for the audit log, role, expiry."""

    hash: str
    name: str
    role: Role
    expires_at: datetime | None = None

    def __post_init__(self) -> None:
        _check_hash(self.hash)
        object.__setattr__(self, "role", Role.parse(self.role))
        if self.expires_at is not None:
            _aware(self.expires_at, "expires_at")

    def __repr__(self) -> str:
        expires = self.expires_at.isoformat() if self.expires_at else None
        return (
            f"OperatorToken(hash={self.hash[:12]}…, name={self.name!r}, role={self.role.value}, "
            f"expires_at={expires})"
        )

    @classmethod
    def issue(
        cls,
        name: str,
        role: Role | str,
        ttl: timedelta | None = None,
        *,
        now: datetime | None = None,
    ) -> tuple[SecretStr, OperatorToken]:
        """A new operator token (no expiry unless ``ttl``): plaintext (show once) and record."""
        if ttl is not None and ttl <= timedelta(0):
            raise ConfigError(f"token lifetime must be positive, got {ttl}")
        t = _aware(now, "now") if now is not None else datetime.now(UTC)
        token = new_token(OPERATOR_PREFIX)
        expires = t + ttl if ttl is not None else None
        return token.plaintext, cls(token.hash, name, Role.parse(role), expires)

    def check(self, now: datetime) -> None:
        """Raise `TokenExpired` when the token has expired at ``now``."""
        if self.expires_at is not None and _aware(now, "now") >= self.expires_at:
            raise TokenExpired(f"operator token {self.name!r} expired")

    def authorize(self, now: datetime, *, mutating: bool, admin: bool = False) -> None:
        """Raise unless this token may make the call: expired → `TokenExpired`, a viewer
        changing something or a non-admin administering → `Forbidden`."""
        self.check(now)
        if admin and not self.role.can_administer:
            raise Forbidden(f"role {self.role.value} cannot do this; it needs role admin")
        if mutating and not self.role.can_mutate:
            raise Forbidden(
                f"role {self.role.value} is read-only; this call needs role operator or admin"
            )
