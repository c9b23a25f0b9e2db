"""The HTTP service: routes, auth, validation, errors, streaming. Never touches a tensor."""
