"""The HTTP service: routes, auth, validation, errors, streaming. Never touches a tensor.

Its modules are imported one by one (`int8serve.service.app.create_app` builds the app), so that the command line
can check a token or reach the policy's Redis and database without importing the app and the engine behind it.
"""
