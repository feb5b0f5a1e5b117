"""The peer's web console: the public page, and the owner's pages behind a login.

``app.Console`` is the ASGI app (Starlette), ``views`` reads what the pages show, and
``templates/`` lays it out (Jinja2, autoescaped). ``p2pgrid.web`` serves it.
"""
