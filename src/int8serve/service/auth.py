"""Who is calling: API token → account id, from the headers Cloudflare's clients send.

Two schemes are accepted, as on api.cloudflare.com:

* `Authorization: Bearer <token>` (documented; curl, the OpenAI SDK, the `cloudflare` SDK with `api_token`);
* `X-Auth-Email` + `X-Auth-Key`: the `cloudflare` SDK sends these *instead of* the bearer token whenever
  `CLOUDFLARE_EMAIL` / `CLOUDFLARE_API_KEY` are set. The key is treated as the token; the email is required
  (as Cloudflare requires it) but not checked, since a self-hosted server has no user directory.

When both are present, `Authorization` wins. Answers (the generic Cloudflare API's):
nothing → 400/9106; a malformed header → 400/6003 with an `error_chain` naming it; an unknown token → 401/10000;
a known token used under another account's URL → 403/10000. On the OpenAI routes missing credentials and a
malformed header are 401, as OpenAI answers a key it cannot use (`errors.OPENAI_STATUS`).

A token is found by the SHA-256 digest of its bytes (`TokenTable`), in one dictionary lookup whatever the number of
tokens (comparing it with every configured token took 16.5 ms of the event loop for each wrong token with 100,001
tokens configured), then compared with the one token of that digest in constant time. Response timing does not
reveal how much of a guessed token was right: what the lookup's timing may depend on is the digest, which says
nothing of the token's characters.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping

from ..accounts import is_valid_token
from .errors import (
    AUTHENTICATION,
    CHAIN_AUTH_EMAIL,
    CHAIN_AUTH_KEY,
    CHAIN_AUTHORIZATION,
    FORBIDDEN,
    INVALID_HEADERS,
    MISSING_AUTH,
    ApiError,
)

__all__ = ["TokenTable", "authenticate", "bearer_token", "check_metrics_token", "is_valid_token",
           "token_account"]


class TokenTable:
    """API token → account id, looked up by the token's SHA-256 digest: one dictionary lookup and at most one
    constant-time comparison a request, whatever the number of tokens."""

    def __init__(self, tokens: Mapping[str, str]) -> None:
        known = ((_token_bytes(token), account) for token, account in tokens.items())
        self._by_digest = {_digest(token): (token, account) for token, account in known}

    def account(self, token: str) -> str | None:
        """The account of `token`, or None when it is not a configured token."""
        sent = _token_bytes(token)
        found = self._by_digest.get(_digest(sent))
        if found is None:
            return None
        known, account = found
        return account if hmac.compare_digest(known, sent) else None  # exact, should two tokens ever share a digest


def _token_bytes(token: str) -> bytes:
    """As UTF-8 bytes: no character can make the digest or the comparison raise (a 500 that would show it)."""
    return token.encode("utf-8", "surrogatepass")


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


# "Bearer" (any case), one or more spaces, then one token of visible ASCII characters.
_BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([\x21-\x7e]+) *")


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (the scheme in any case, RFC 9110 section 11.1), or
    None when the header is missing or is not one."""
    match = _BEARER.fullmatch(authorization) if authorization is not None else None
    return match.group(1) if match is not None else None


def check_metrics_token(authorization: str | None, metrics_token: str | None) -> None:
    """`/metrics` with `--metrics-token`: raise 401/10000 unless `authorization` is `Bearer <that token>`; compared
    in constant time, so the answer's timing does not tell how much of a guess was right. Compared as UTF-8 bytes:
    no character of either side can make the comparison raise (a 500 whose traceback would show the token)."""
    if metrics_token is None:
        return
    sent = bearer_token(authorization) or ""
    if not hmac.compare_digest(sent.encode("utf-8", "surrogatepass"), metrics_token.encode("utf-8", "surrogatepass")):
        raise ApiError(AUTHENTICATION)


def authenticate(headers: Mapping[str, str], account_id: str, tokens: TokenTable) -> str:
    """The account id the request may act for (== `account_id`), or raise the matching `ApiError`.

    `headers` is case-insensitive (Starlette's `Headers`).
    """
    account = token_account(headers, tokens)
    if not hmac.compare_digest(account.encode("utf-8"), account_id.encode("utf-8")):
        raise ApiError(FORBIDDEN)
    return account


def token_account(headers: Mapping[str, str], tokens: TokenTable) -> str:
    """The account of the request's token, for routes whose URL names no account (`/v1/...`, `/accounts`)."""
    account = tokens.account(_credential(headers))
    if account is None:
        raise ApiError(AUTHENTICATION)
    return account


def _credential(headers: Mapping[str, str]) -> str:
    authorization = headers.get("authorization")
    if authorization is not None:
        token = bearer_token(authorization)
        if token is None:
            raise ApiError(INVALID_HEADERS, error_chain=[CHAIN_AUTHORIZATION])
        return token
    key, email = headers.get("x-auth-key"), headers.get("x-auth-email")
    if key is None and email is None:
        raise ApiError(MISSING_AUTH)
    if key is None or not is_valid_token(key.strip()):
        raise ApiError(INVALID_HEADERS, error_chain=[CHAIN_AUTH_KEY])
    if email is None or not email.strip():
        raise ApiError(INVALID_HEADERS, error_chain=[CHAIN_AUTH_EMAIL])
    return key.strip()
