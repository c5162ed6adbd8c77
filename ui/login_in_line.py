"""Gradio 6.17 checks the login on its routes through two plain-def FastAPI dependencies (gradio/routes.py:
`get_current_user`, `login_check`), and FastAPI runs every plain-def dependency in a worker thread. A turn's POST and
its event stream took four thread hops on the busy event loop before the turn was queued: FastAPI's dependency
solving was 6.5 % of the web server's samples at 32 users (py-spy, CPU; issue 14). Unless the app has a login
callback of its own (Gradio's `auth_dependency`, which may block; this app sets none), both are a cookie and a
dictionary lookup, so they run in line on the loop: the same functions, the same answers and refusals.

FastAPI hands plain-def dependencies to `fastapi.dependencies.utils.run_in_threadpool`; that name is wrapped once, to
call these two functions (of the apps it was told about) directly and pass everything else on.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager

log = logging.getLogger(__name__)

LOGIN_DEPENDENCIES = ("get_current_user", "login_check")  # gradio/routes.py, App.create_app


def _routes(router) -> Iterator:
    """Every route with a dependency tree under `router`, through included routers and mounts."""
    for route in getattr(router, "routes", ()):
        if getattr(route, "dependant", None) is not None:
            yield route
        for inner in (getattr(route, "original_router", None), getattr(route, "app", None)):
            if inner is not None and inner is not route:
                yield from _routes(inner)


def login_dependencies(app) -> set[Callable]:
    """Gradio's login functions on `app`'s routes."""
    found: set[Callable] = set()

    def visit(dependant) -> None:
        for sub in dependant.dependencies:
            visit(sub)
            call = sub.call
            if getattr(call, "__name__", "") in LOGIN_DEPENDENCIES and getattr(call, "__module__", "") == "gradio.routes":
                found.add(call)

    for route in _routes(app):
        visit(route.dependant)
    return found


def run_login_check_in_line(app) -> int:
    """Call Gradio's login functions of `app` on the event loop from now on; returns how many there are."""
    if getattr(app, "auth_dependency", None) is not None:
        return 0  # the app's own login callback may block: it stays in a worker thread
    from fastapi.dependencies import utils  # noqa: PLC0415

    found = login_dependencies(app)
    threadpool = getattr(utils, "run_in_threadpool", None)
    if not found or threadpool is None:
        log.warning("Gradio's or FastAPI's routes have changed: the login check stays in a worker thread")
        return 0
    in_line = getattr(threadpool, "in_line", None)
    if in_line is None:
        in_line = weakref.WeakSet()  # an app's functions go with it (the tests launch many)

        async def run_in_threadpool(func, *args, **kwargs):
            if func in in_line:
                return func(*args, **kwargs)
            return await threadpool(func, *args, **kwargs)

        run_in_threadpool.in_line = in_line
        utils.run_in_threadpool = run_in_threadpool
    in_line.update(found)
    return len(found)


def login_in_line_lifespan() -> Callable:
    """A FastAPI lifespan (Gradio passes `app_kwargs['lifespan']` on) that does the above once every route is
    registered, before the server takes its first request."""

    @asynccontextmanager
    async def lifespan(app):
        log.debug("%d login functions run in line", run_login_check_in_line(app))
        yield

    return lifespan
