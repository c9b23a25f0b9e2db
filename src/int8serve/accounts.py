"""What an account id may be: what the usage ledger can store and what a URL carries as it is; and what a token may
be: what an HTTP header carries.

Account ids come from the operator (`--token TOKEN=ACCOUNT_ID`, `--tokens-file`, `INT8SERVE_TOKENS`, the config
file; `--account-rpm ACCOUNT=N`) and are checked when the server starts, so that none can fail later: every ledger
row names its account, in a column of `MAX_ACCOUNT_ID_LENGTH` characters (PostgreSQL refuses a longer value), and
clients put the id in URLs (`/client/v4/accounts/{account_id}/...`), where other characters would need escaping.
Cloudflare's own account ids are 32 hex digits. Tokens (the API's and `--metrics-token`) are sent as
`Authorization: Bearer <token>`, so they are visible ASCII without spaces.

This module imports nothing, so that the command line can check ids and tokens before it loads anything else.
"""

from __future__ import annotations

import re

__all__ = ["ACCOUNT_ID_RULE", "MAX_ACCOUNT_ID_LENGTH", "TOKEN_RULE", "is_valid_account", "is_valid_token"]

MAX_ACCOUNT_ID_LENGTH = 128  # the ledger's `account` column
ACCOUNT_ID_RULE = (f"1 to {MAX_ACCOUNT_ID_LENGTH} characters: ASCII letters, digits and . _ ~ -, starting with a "
                   "letter or digit")
_ACCOUNT_ID = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._~-]{{0,{MAX_ACCOUNT_ID_LENGTH - 1}}}")
TOKEN_RULE = "one or more visible ASCII characters (no spaces)"
_TOKEN = re.compile(r"[\x21-\x7e]+")


def is_valid_account(account: object) -> bool:
    """Can this be configured as an account id (`ACCOUNT_ID_RULE`)?"""
    return isinstance(account, str) and _ACCOUNT_ID.fullmatch(account) is not None


def is_valid_token(token: object) -> bool:
    """Can this be configured as a token, i.e. sent in a header (`TOKEN_RULE`)?"""
    return isinstance(token, str) and _TOKEN.fullmatch(token) is not None
