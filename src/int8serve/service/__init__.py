"""The HTTP service: routes, auth, validation, errors, streaming. Never touches a tensor."""

from .app import create_app

__all__ = ["create_app"]
