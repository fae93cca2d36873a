"""Enrolment and operator tokens: format, hashing, expiry, uses, roles, and no leaked secrets."""

from __future__ import annotations

import hashlib
import logging
import re
import traceback
from datetime import UTC, datetime, timedelta

import pytest

from edgewise.errors import ConfigError, PeerError
from edgewise.security import tokens
from edgewise.security.tokens import (
    EnrolmentToken,
    Forbidden,
    OperatorToken,
    Role,
    TokenExpired,
    TokenInvalid,
    TokenUsedUp,
    check_format,
    hash_token,
    new_token,
    verify,
)

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
HASH = "ab" * 32


def test_new_token_format_and_hash() -> None:
    token = new_token("ewe")
    text = token.plaintext.get_secret_value()
    assert re.fullmatch(r"ewe_[A-Za-z0-9_-]{43}", text)
    assert token.hash == hashlib.sha256(text.encode()).hexdigest()
    assert hash_token(text) == token.hash
    assert hash_token(token.plaintext) == token.hash
    assert re.fullmatch(r"ewo_[A-Za-z0-9_-]{43}", new_token("ewo").plaintext.get_secret_value())
    made = {new_token().plaintext.get_secret_value() for _ in range(100)}
    assert len(made) == 100
    with pytest.raises(ValueError, match="prefix must be 2-8 lower-case letters"):
        new_token("EWE")


def test_plaintext_never_in_repr_str_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    token = new_token()
    text = token.plaintext.get_secret_value()
    plaintext, record = EnrolmentToken.issue({"site": "plant1"}, now=NOW)
    op_plain, op_record = OperatorToken.issue("ci", "operator", now=NOW)
    secrets = [text, plaintext.get_secret_value(), op_plain.get_secret_value()]
    logger = logging.getLogger("test.tokens")
    with caplog.at_level(logging.DEBUG, logger="test.tokens"):
        logger.info("made %s %r", token, token)
        logger.info("enrolment %s %r %s", plaintext, record, record)
        logger.info("operator %s %r %s", op_plain, op_record, op_record)
    shown = [
        repr(token), str(token), f"{token}", repr(token.plaintext), str(token.plaintext),
        repr(record), str(record), repr(op_record), caplog.text,
    ]
    for s in secrets:
        for out in shown:
            assert s not in out
            assert s[4:20] not in out  # not even a piece of it
    assert "**********" in repr(token)
    assert record.hash[:12] in repr(record)


def test_token_error_messages_hold_no_secret() -> None:
    text = new_token("ewo").plaintext.get_secret_value()
    with pytest.raises(TokenInvalid) as info:
        check_format(text, "ewe")
    assert str(info.value) == "wrong kind of token: ewo_..., expected ewe_..."
    assert text[4:] not in "".join(traceback.format_exception(info.value))


def test_verify() -> None:
    token = new_token()
    text = token.plaintext.get_secret_value()
    assert verify(text, token.hash) is True
    assert verify(token.plaintext, token.hash) is True
    assert verify(text, token.hash.upper()) is True
    assert verify(text[:-1] + ("A" if text[-1] != "A" else "B"), token.hash) is False
    assert verify(text, new_token().hash) is False
    assert verify("", token.hash) is False
    assert verify(text, "") is False
    assert verify(text, "é" * 64) is False
    long = "x" * (tokens.MAX_TOKEN_CHARS + 1)
    assert verify(long, hash_token(long)) is False


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "malformed token"),
        ("ewe_short", "malformed token"),
        ("ewe_" + "a" * 44, "malformed token"),
        ("ewe_" + "a" * 42 + "!", "malformed token"),
        ("x" * 500, "malformed token"),
        ("ewo_" + "a" * 43, "wrong kind of token: ewo_..., expected ewe_..."),
    ],
    ids=["empty", "short", "long", "bad-char", "huge", "wrong-kind"],
)
def test_check_format_refuses(text: str, message: str) -> None:
    with pytest.raises(TokenInvalid, match=re.escape(message)) as info:
        check_format(text, "ewe")
    assert info.value.status == 401
    assert isinstance(info.value, PeerError)


def test_check_format_accepts() -> None:
    token = new_token("ewe")
    assert check_format(token.plaintext, "ewe") == token.hash


# --- enrolment tokens --------------------------------------------------------------------------


def test_enrolment_token_issue() -> None:
    plaintext, record = EnrolmentToken.issue(
        {"site": "plant1", "line": "1"}, ttl=timedelta(hours=2), uses=3, now=NOW
    )
    assert plaintext.get_secret_value().startswith("ewe_")
    assert record.hash == hash_token(plaintext)
    assert dict(record.labels) == {"site": "plant1", "line": "1"}
    assert record.expires_at == NOW + timedelta(hours=2)
    assert record.uses_left == 3
    _, default = EnrolmentToken.issue(now=NOW)
    assert (default.expires_at, default.uses_left, dict(default.labels)) == (
        NOW + timedelta(hours=1), 1, {})


def test_enrolment_token_single_use() -> None:
    _, token = EnrolmentToken.issue({"site": "a"}, now=NOW)
    token.check(NOW)
    used = token.consume(NOW + timedelta(minutes=1))
    assert used.uses_left == 0
    assert token.uses_left == 1  # records are immutable
    assert dict(used.labels) == {"site": "a"}
    with pytest.raises(TokenUsedUp, match="used up; create a new one") as info:
        used.check(NOW + timedelta(minutes=2))
    assert info.value.status == 401
    with pytest.raises(TokenUsedUp):
        used.consume(NOW + timedelta(minutes=2))


def test_enrolment_token_uses_count_down() -> None:
    _, token = EnrolmentToken.issue(uses=3, now=NOW)
    left = []
    for _ in range(3):
        token = token.consume(NOW)
        left.append(token.uses_left)
    assert left == [2, 1, 0]
    with pytest.raises(TokenUsedUp):
        token.consume(NOW)


def test_enrolment_token_expiry_boundary() -> None:
    _, token = EnrolmentToken.issue(ttl=timedelta(hours=1), now=NOW)
    token.check(NOW + timedelta(minutes=59, seconds=59))
    with pytest.raises(TokenExpired, match="expired at 2026-03-01 13:00:00 UTC"):
        token.check(NOW + timedelta(hours=1))
    with pytest.raises(TokenExpired):
        token.consume(NOW + timedelta(days=1))
    # expiry is checked before uses: an expired, used-up token says "expired"
    spent = EnrolmentToken(HASH, {}, NOW, 0)
    with pytest.raises(TokenExpired):
        spent.check(NOW)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"ttl": timedelta(0)}, ConfigError, "lifetime must be positive"),
        ({"uses": 0}, ConfigError, "at least one use"),
        ({"labels": {"Site": "a"}}, ConfigError, "invalid label key 'Site'"),
        ({"labels": {"site": "a b"}}, ConfigError, "invalid value 'a b' for label site"),
        ({"labels": {"site": "x" * 64}}, ConfigError, "invalid value"),
        ({"now": datetime(2026, 3, 1)}, ValueError, "timezone-aware"),
    ],
    ids=["ttl", "uses", "key", "value", "long-value", "naive-now"],
)
def test_enrolment_token_issue_refuses(kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        EnrolmentToken.issue(**kwargs)


def test_enrolment_token_record_validation() -> None:
    with pytest.raises(ValueError, match="64 lower-case hex"):
        EnrolmentToken("not-a-hash", {}, NOW, 1)
    with pytest.raises(ValueError, match="non-negative"):
        EnrolmentToken(HASH, {}, NOW, -1)
    with pytest.raises(ValueError, match="timezone-aware"):
        EnrolmentToken(HASH, {}, datetime(2026, 3, 1), 1)
    token = EnrolmentToken(HASH, {"site": ""}, NOW, 1)
    with pytest.raises(TypeError):
        token.labels["site"] = "changed"  # type: ignore[index]


# --- operator tokens and roles -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "can_mutate", "can_administer"),
    [("admin", True, True), ("operator", True, False), ("viewer", False, False)],
)
def test_roles(role: str, can_mutate: bool, can_administer: bool) -> None:
    r = Role.parse(role)
    assert (r.can_mutate, r.can_administer) == (can_mutate, can_administer)
    assert r.value == role


def test_unknown_role() -> None:
    with pytest.raises(ConfigError, match="unknown role 'root'; choose one of admin, operator"):
        Role.parse("root")


@pytest.mark.parametrize(
    ("role", "mutating", "admin", "outcome"),
    [
        ("viewer", False, False, None),
        ("viewer", True, False, "role viewer is read-only"),
        ("viewer", False, True, "needs role admin"),
        ("operator", True, False, None),
        ("operator", True, True, "needs role admin"),
        ("admin", True, True, None),
    ],
    ids=["viewer-read", "viewer-mutate", "viewer-admin", "operator-mutate", "operator-admin",
         "admin-admin"],
)
def test_operator_token_authorize(role, mutating, admin, outcome) -> None:
    _, token = OperatorToken.issue("alice", role, now=NOW)
    if outcome is None:
        assert token.authorize(NOW, mutating=mutating, admin=admin) is None
    else:
        with pytest.raises(Forbidden, match=outcome) as info:
            token.authorize(NOW, mutating=mutating, admin=admin)
        assert info.value.status == 403


def test_operator_token_expiry() -> None:
    plaintext, token = OperatorToken.issue("ci", Role.ADMIN, ttl=timedelta(days=1), now=NOW)
    assert plaintext.get_secret_value().startswith("ewo_")
    assert token.role is Role.ADMIN
    token.authorize(NOW + timedelta(hours=23), mutating=True)
    with pytest.raises(TokenExpired, match="operator token 'ci' expired"):
        token.authorize(NOW + timedelta(days=1), mutating=False)
    _, forever = OperatorToken.issue("admin", "admin", now=NOW)
    assert forever.expires_at is None
    forever.check(NOW + timedelta(days=3650))
    with pytest.raises(ConfigError, match="unknown role"):
        OperatorToken(HASH, "x", "superuser")  # type: ignore[arg-type]
