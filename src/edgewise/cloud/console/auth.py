"""The console's sign-in: an operator token kept in a cookie, and the CSRF check of every form.

Signing in (``POST /console/login``) takes an operator token (the same tokens and roles as the
operator API), checks it against the store and puts it in the ``edgewise_console`` cookie:
HttpOnly (no script reads it), Secure (TLS only: the console shares the control plane's one TLS
port), SameSite=Strict (no other site's page sends it), path ``/console``, 12 hours. Every page
checks it again (a revoked or expired token signs the browser out at its next click).

Every form that changes something carries a CSRF token: HMAC-SHA256 of the operator token's hash
under a key made when the control plane starts (so a form from before a restart is refused: sign
in again). A POST without the right one is refused with 403, whatever its cookie. Errors are
the exception tree's, answered by the control plane's one mapping (`http_errors`) through the
wrapper `guarded` that `console.setup` puts round every handler.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import parse_qsl

from aiohttp import web

from edgewise.cloud.http_errors import BodyTooLarge, error_answer
from edgewise.cloud.operator_call import NOW, actor_of
from edgewise.cloud.state import STORE
from edgewise.errors import BadRequest, EdgewiseError
from edgewise.security.tokens import (
    OPERATOR_PREFIX,
    Forbidden,
    OperatorToken,
    TokenInvalid,
    check_format,
)

COOKIE = "edgewise_console"
COOKIE_MAX_AGE = 12 * 3600  # seconds a sign-in lasts in the browser
MAX_FORM = 8 * 1024  # bytes of one console form (a token, a reason, labels)

CSRF_KEY = web.AppKey("console_csrf_key", bytes)


class NotSignedIn(Exception):
    """No valid sign-in: the page redirects to the sign-in form."""


@dataclass(frozen=True)
class Viewer:
    """Who is looking: their token, its role, and the CSRF value of their forms."""

    token: OperatorToken
    csrf: str

    @property
    def actor(self) -> str:
        return actor_of(self.token)

    @property
    def role(self) -> str:
        return self.token.role.value

    @property
    def can_act(self) -> bool:
        return self.token.role.can_mutate

    @property
    def is_admin(self) -> bool:
        return self.token.role.can_administer


def setup(app: web.Application) -> None:
    app[CSRF_KEY] = secrets.token_bytes(32)


def now(request: web.Request) -> datetime:
    clock = request.app.get(NOW)
    return clock() if clock is not None else datetime.now(UTC)


def csrf_for(app: web.Application, token_hash: str) -> str:
    return hmac.new(app[CSRF_KEY], token_hash.encode(), hashlib.sha256).hexdigest()


async def token_of(request: web.Request, plaintext: str) -> OperatorToken:
    """The stored token for ``plaintext``; `TokenInvalid` / `TokenExpired` otherwise."""
    token_hash = check_format(plaintext.strip(), OPERATOR_PREFIX)
    token = await request.app[STORE].get_operator_token(token_hash)
    if token is None:
        raise TokenInvalid("unknown or revoked operator token")
    token.check(now(request))
    return token


async def viewer(request: web.Request) -> Viewer:
    """The signed-in viewer of this request; `NotSignedIn` without a valid cookie."""
    plaintext = request.cookies.get(COOKIE)
    if not plaintext or len(plaintext) > 200:
        raise NotSignedIn
    try:
        token = await token_of(request, plaintext)
    except EdgewiseError:
        raise NotSignedIn from None
    return Viewer(token, csrf_for(request.app, token.hash))


async def read_form(request: web.Request) -> dict[str, str]:
    """The fields of a url-encoded form, at most `MAX_FORM` bytes (413 above)."""
    too_large = BodyTooLarge(f"a console form is at most {MAX_FORM} bytes")
    if request.content_length is not None and request.content_length > MAX_FORM:
        raise too_large
    body = await request.content.read(MAX_FORM + 1)
    if len(body) > MAX_FORM:
        raise too_large
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=50)
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("the form could not be read") from None
    return dict(pairs)


async def acting_viewer(request: web.Request) -> tuple[Viewer, dict[str, str]]:
    """The viewer of a POST and its form, after the CSRF check (403 without the right one)."""
    try:
        who = await viewer(request)
    except NotSignedIn:
        raise Forbidden("not signed in to the console") from None
    form = await read_form(request)
    if not hmac.compare_digest(form.get("csrf", ""), who.csrf):
        raise Forbidden("the form's CSRF token is missing or wrong: reload the page and try "
                        "again")
    return who, form


def guarded(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
            ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """``handler`` with its `EdgewiseError` answered by `http_errors.error_answer`."""
    async def serve(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except EdgewiseError as exc:
            answer = error_answer(exc)
            if answer is None:
                raise
            return answer

    serve.__name__ = handler.__name__
    return serve


def sign_in(response: web.StreamResponse, plaintext: str) -> None:
    response.set_cookie(COOKIE, plaintext.strip(), max_age=COOKIE_MAX_AGE, path="/console",
                        secure=True, httponly=True, samesite="Strict")


def sign_out(response: web.StreamResponse) -> None:
    response.del_cookie(COOKIE, path="/console", secure=True, httponly=True, samesite="Strict")
