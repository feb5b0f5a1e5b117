"""The console's ASGI app: Starlette routes, server-side sessions, CSRF, the owner's forms.

Anyone gets the public page. The owner logs in with the token in
``DATA_DIR/console-token`` (printed when the peer starts); failed logins are counted
per client address, so someone else's guesses never lock the owner out. A session is
a random id in an HttpOnly SameSite=Strict cookie, named per peer (cookies ignore
ports); sessions live in this process only, so a restart or logout ends them.

Every state-changing request is a POST that carries the session's CSRF token and
comes from this origin; each answers with a redirect to a page (POST-redirect-GET)
and a one-line flash. The forms call the same functions as the owner's commands
(:mod:`p2pgrid.governance.actions`, :func:`p2pgrid.owner.change_rules`), and each
change is audited as done by ``NAME (console)``. A refused value answers 4xx with
the page and the one-line reason.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qs

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from ..errors import BadRequest, P2PError
from ..limits import Throttle
from ..server import handle_lifespan
from . import views
from .render import render

log = logging.getLogger("p2pgrid.web")

SESSION_TTL = 12 * 3600.0
MAX_FORM = 64 * 1024
LOGIN_FAILURES = 20  # per client address per minute, then 429 for that address
CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-frame-options", b"DENY"),
           (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"same-origin"),
           (b"cache-control", b"no-store")]


@dataclass
class Session:
    csrf: str
    created: float
    flash: list[tuple[str, str]] = field(default_factory=list)


class Refused(Exception):
    """A request answered with `status` and a plain one-line `text`."""

    def __init__(self, status: int, text: str):
        super().__init__(text)
        self.status, self.text = status, text


class Console:
    """The ASGI app of the console listener (see the module docstring)."""

    def __init__(self, peer, gov, *, secure: bool = False):
        self.peer, self.gov, self.secure = peer, gov, secure
        self.by = f"{peer.name} (console)"
        self.sessions: dict[str, Session] = {}
        self.cookie = f"p2pgrid_{peer.key_id}"
        self._failures = Throttle(LOGIN_FAILURES, 60.0)
        forms = [("/logout", self._logout), ("/requests/{rid}", self._decide),
                 ("/data/{oid}/rules", self._rules), ("/data/{oid}/bounds", self._bounds),
                 ("/users", self._add_user), ("/users/{name}/remove", self._remove_user),
                 ("/users/mode", self._mode), ("/budget/user", self._budget),
                 ("/budget/default", self._default_budget), ("/budget/guests", self._guest_budget),
                 ("/grants/revoke", self._revoke)]
        routes = [Route("/", self._home, methods=["GET"]),
                  Route("/health", lambda r: PlainTextResponse("ok\n"), methods=["GET"]),
                  Route("/login", self._login_get, methods=["GET"]),
                  Route("/login", self._login_post, methods=["POST"]),
                  Route("/audit", self._audit, methods=["GET"])]
        routes += [Route(path, self._form(fn), methods=["POST"]) for path, fn in forms]
        self.app = Starlette(routes=routes, max_body_size=MAX_FORM,
                             exception_handlers={404: self._not_found, 405: self._not_allowed})

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await handle_lifespan(receive, send)
        if scope["type"] != "http":
            return
        started = False

        async def send_with_headers(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
                msg = {**msg, "headers": [*msg.get("headers", []), *HEADERS]}
            await send(msg)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            log.exception("console request failed")
            if not started:
                await PlainTextResponse("internal error; see the peer's log\n", 500)(
                    scope, receive, send_with_headers)

    # ------------------------------------------------------------ sessions and checks

    def session(self, request: Request) -> Session | None:
        now = time.time()
        self.sessions = {k: s for k, s in self.sessions.items() if now - s.created < SESSION_TTL}
        value = request.cookies.get(self.cookie, "")
        for sid, s in self.sessions.items():
            if value and hmac.compare_digest(sid, value):
                return s
        return None

    @staticmethod
    def same_origin(request: Request) -> bool:
        h = request.headers
        site = h.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            return False
        origin = h.get("origin")
        if origin is None:
            return True  # not a browser's cross-site form (those carry an origin); the token decides
        if origin == "null":
            return site == "same-origin"
        return origin.split("://", 1)[-1] == (h.get("host") or "")

    async def read_form(self, request: Request) -> dict[str, str]:
        """The urlencoded form (bounded by MAX_FORM: Starlette answers 413 past it)."""
        if not self.same_origin(request):
            raise Refused(403, "cross-site request refused")
        body = await request.body()
        return {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}

    def _form(self, action):
        """Wrap an owner form: same origin, a session, its CSRF token; then `action`
        (which returns where to go and a flash, or raises P2PError) and a redirect."""
        async def endpoint(request: Request) -> Response:
            try:
                form = await self.read_form(request)
                session = self.session(request)
                if session is None:
                    return await self._login_page(request, "log in first (your session ended)", 401)
                if not hmac.compare_digest(form.get("csrf", "").encode(), session.csrf.encode()):
                    raise Refused(403, "missing or wrong CSRF token; reload the page")
            except Refused as e:
                return PlainTextResponse(e.text + "\n", e.status)
            try:
                to, flash = await action(request, session, form)
            except P2PError as e:
                session.flash.append(("err", e.message))
                return await self._home(request, status=e.status)
            if flash:
                session.flash.append(("ok", flash))
            return self._redirect(to, clear=to is None)
        return endpoint

    def _redirect(self, to: str | None, *, cookie: str | None = None, clear: bool = False) -> Response:
        resp = RedirectResponse(to or "/", status_code=303)
        if cookie is not None:
            resp.set_cookie(self.cookie, cookie, max_age=int(SESSION_TTL), path="/", httponly=True,
                            samesite="strict", secure=self.secure)
        if clear:
            resp.delete_cookie(self.cookie, path="/", httponly=True, samesite="strict",
                               secure=self.secure)
        return resp

    # ------------------------------------------------------------ pages

    async def _page(self, template: str, context: dict, status: int = 200) -> HTMLResponse:
        text = await trio.to_thread.run_sync(render, template, context)
        return HTMLResponse(text, status)

    async def _home(self, request: Request, status: int = 200) -> Response:
        session = self.session(request)
        if session is None:
            ctx = views.public(self.peer)
            return await self._page("public.html", {**ctx, "login": True}, status)
        metas = await trio.to_thread.run_sync(self._objects)
        ctx = await trio.to_thread.run_sync(views.owner, self.peer, self.gov, metas)
        flash, session.flash = list(session.flash), []
        return await self._page("owner.html", {**ctx, "csrf": session.csrf, "flash": flash}, status)

    def _objects(self):
        """This peer's own published data (not objects others stored here)."""
        return [m for m in self.peer.store.list() if m.expires is None]

    async def _audit(self, request: Request) -> Response:
        session = self.session(request)
        if session is None:
            return await self._login_page(request, "log in to see the audit trail", 401)
        q = request.query_params
        try:
            before = int(q["before"]) if q.get("before") else None
            after = int(q["after"]) if q.get("after") else None
        except ValueError:
            return PlainTextResponse("before and after are entry numbers\n", 400)
        ctx = await trio.to_thread.run_sync(lambda: views.audit(
            self.peer, self.gov, before=before, after=after, action=q.get("action", "").strip(),
            caller=q.get("caller", "").strip()))
        return await self._page("audit.html", {**ctx, "csrf": session.csrf, "flash": []})

    async def _login_page(self, request: Request, error: str = "", status: int = 200) -> Response:
        ctx = {"peer": views.peer_header(self.peer), "error": error}
        return await self._page("login.html", ctx, status)

    async def _not_found(self, request: Request, exc) -> Response:
        return await self._page("not_found.html", {"peer": views.peer_header(self.peer)}, 404)

    async def _not_allowed(self, request: Request, exc) -> Response:
        return PlainTextResponse("method not allowed\n", 405)

    # ------------------------------------------------------------ login

    async def _login_get(self, request: Request) -> Response:
        token = request.query_params.get("token", "")
        if not token:
            return await self._login_page(request)
        return await self._login(request, token)

    async def _login_post(self, request: Request) -> Response:
        try:
            form = await self.read_form(request)
        except Refused as e:
            return PlainTextResponse(e.text + "\n", e.status)
        return await self._login(request, form.get("token", ""))

    async def _login(self, request: Request, token: str) -> Response:
        address = str(request.client.host if request.client else "?")
        if self._failures.blocked(address):
            return PlainTextResponse("too many failed logins from your address; wait a minute\n", 429)
        if not token or not hmac.compare_digest(token.encode(), self.gov.token.encode()):
            self._failures.fail(address)
            self.peer.audit("console.login_failed", None)
            return await self._login_page(request, "wrong token", 403)
        sid = secrets.token_urlsafe(32)
        self.sessions[sid] = Session(secrets.token_urlsafe(32), time.time())
        self.peer.audit("console.login", "owner")
        return self._redirect("/", cookie=sid)

    async def _logout(self, request, session, form):
        self.sessions = {k: s for k, s in self.sessions.items() if s is not session}
        return None, ""

    # ------------------------------------------------------------ the owner's forms

    async def _store(self, fn, *args, **kw):
        """Run a governance write in a worker thread (SQLite), audited as the console's."""
        return await trio.to_thread.run_sync(lambda: fn(self.gov.store, *args, by=self.by, **kw))

    async def _decide(self, request, session, form):
        rid = request.path_params["rid"]
        decision = form.get("decision")
        if decision not in ("approve", "deny"):
            raise BadRequest("decision must be approve or deny")
        req = await trio.to_thread.run_sync(lambda: self.gov.store.decide(
            rid, approve=decision == "approve", why=form.get("why", "").strip(), by=self.by))
        self.gov.notify()
        return "/#requests", f"Request {req['id']} of {req['user']} {req['status']}."

    async def _rules(self, request, session, form):
        from ..owner import change_rules

        oid = request.path_params["oid"]
        edits = {right: _names(form.get(right, "")) for right in ("compute", "get", "aggregate")
                 if right in form}
        min_rows = form.get("min_rows", "").strip()
        if min_rows and not min_rows.isdigit():
            raise BadRequest("min rows must be a whole number >= 0")
        meta = await change_rules(self.peer, oid, edits, int(min_rows) if min_rows else None,
                                  by=self.by)
        r = meta.rules
        return (f"/#data-{oid}", f"Rules of {oid}: compute {views.names(r.compute)}; get "
                f"{views.names(r.get)}; aggregate {views.names(r.aggregate)} "
                f"(≥ {r.min_rows} rows).")

    async def _bounds(self, request, session, form):
        from ..governance import actions

        oid = request.path_params["oid"]
        bounds, cap = await self._store(actions.set_bounds, oid, form.get("bounds", ""),
                                        form.get("total", ""))
        total = f", total ε {views.num(cap)}" if cap is not None else ", no total cap"
        text = " ".join(f"{views.num(lo)}:{views.num(hi)}" for lo, hi in bounds.to_list())
        return f"/#data-{oid}", f"Bounds of {oid}: {text}{total}."

    async def _add_user(self, request, session, form):
        from ..governance import actions

        user = await self._store(actions.add_user, form.get("name", ""), form.get("role", ""),
                                 form.get("key") or None)
        bound = "" if user.public_key is not None else " (key bound on first use)"
        return "/#users", f"{user.name}: {user.role}{bound}."

    async def _remove_user(self, request, session, form):
        from ..governance import actions

        name = request.path_params["name"]
        await self._store(actions.remove_user, name)
        return "/#users", f"Removed {name}."

    async def _mode(self, request, session, form):
        from ..governance import actions

        await self._store(actions.set_mode, form.get("mode", ""))
        return "/#users", f"Mode: {actions.MODES[form['mode']]}."

    async def _budget(self, request, session, form):
        from ..governance import actions

        user, dataset = form.get("user", ""), form.get("dataset", "").strip() or None
        value = await self._store(actions.set_budget, user, form.get("epsilon", ""), dataset)
        where = f" on {dataset}" if dataset else " in total"
        return "/#users", f"{user.strip()}: ε {views.num(value)}{where}."

    async def _default_budget(self, request, session, form):
        from ..governance import actions

        value = await self._store(actions.set_default_budget, form.get("epsilon", ""))
        return "/#users", f"Default budget: ε {views.num(value)}."

    async def _guest_budget(self, request, session, form):
        from ..governance import actions

        value = await self._store(actions.set_guest_budget, form.get("epsilon", ""))
        shown = "the default budget" if value is None else f"ε {views.num(value)}"
        return "/#users", f"Unregistered callers together: {shown}."

    async def _revoke(self, request, session, form):
        from ..governance import actions

        user, oid, right = form.get("user", ""), form.get("object", ""), form.get("right", "get")
        await self._store(actions.revoke_grant, user, oid, right)
        return "/#grants", f"Revoked {user}'s {right} on {oid}."


def _names(text: str) -> list[str]:
    """A rule field: names separated by commas or spaces ('*': anyone; '+x'/'-x': edits)."""
    return [n for n in text.replace(",", " ").split() if n]
