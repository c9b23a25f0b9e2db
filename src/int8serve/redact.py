"""Secrets out of messages: no password or token is ever printed whole (logs, errors, the start-up summary).

The one exception is the API token `serve` makes when none is configured, printed once on purpose so that the
operator can use it.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

__all__ = ["hide_password", "without"]


def hide_password(url: str) -> str:
    """`url` with its password replaced by `***` (a string that does not parse as a URL is not shown at all)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = f"{parts.username or ''}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    except ValueError:
        return "<an unparsable URL>"
    return urlunsplit(parts._replace(netloc=netloc))


def without(text: str, *secrets: str | None) -> str:
    """`text` with every occurrence of each secret (and of a URL's password) replaced by `***`."""
    for secret in secrets:
        if not secret:
            continue
        text = text.replace(secret, hide_password(secret) if "://" in secret else "***")
        try:
            password = urlsplit(secret).password
        except ValueError:
            password = None
        if password:
            text = text.replace(password, "***")
    return text
