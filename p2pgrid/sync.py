"""p2pgrid without trio: a blocking API (notebooks, scripts) and an asyncio one.

    net = p2pgrid.connect_sync("bob", join=["KEYID@10.0.0.5:7000"])
    hits = net.search("#birth-records")
    print(hits["hospital"][0][:, 0].mean().get())
    net.close()                      # or: with p2pgrid.connect_sync(...) as net:

Your peer runs on a background thread inside its own ``trio.run``. What you get
back is a *proxy* of the async object (:class:`p2pgrid.Network`, a pointer, a
model...) generated from it: every attribute is looked up on the real object,
every ``async def`` method runs on the peer's thread and blocks until done, and
whatever it returns that has async methods of its own (pointers, requests,
sessions) comes back proxied the same way. The names, arguments and docstrings
are the async API's; there is no second copy of them.

Interrupting a blocking call (Ctrl-C, Jupyter's "interrupt kernel", i.e. SIGINT
in the calling thread) cancels that call's trio task and raises
``KeyboardInterrupt``; the peer keeps running and the handle stays usable.

From asyncio (Jupyter cells can ``await``): ``net.aio`` is the same proxy whose
async methods return asyncio awaitables instead of blocking, over the same
background thread, so the asyncio loop is never blocked; cancelling the asyncio
task cancels the trio task. :func:`connect_asyncio` starts the peer without
blocking the loop::

    async with p2pgrid.connect_asyncio("bob", join=[...]) as net:
        hits = await net.search("#birth-records")
        print(await hits["hospital"][0].mean().get())

The peer stops on ``close()``, at the end of a ``with`` block, and at interpreter
exit (kernel restart), leaving no thread or socket behind.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import functools
import inspect
import threading
import weakref
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Iterable

import trio

_CLOSE_TIMEOUT = 30.0
_bridges: "weakref.WeakSet[Bridge]" = weakref.WeakSet()


class Bridge:
    """One background thread running trio; calls from other threads run as tasks in it."""

    def __init__(self, name: str = "p2pgrid"):
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"{name}-trio", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._failure is not None:
            raise self._failure
        _bridges.add(self)

    def _run(self) -> None:
        async def main():
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._ready.set()
                await self._stop.wait()
                nursery.cancel_scope.cancel()
        try:
            trio.run(main)
        except BaseException as e:  # noqa: BLE001 - reported to the thread that waits
            self._failure = e
        finally:
            self._nursery = None
            self._ready.set()

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and self._nursery is not None

    def submit(self, afn: Callable, *args, **kwargs) -> tuple[concurrent.futures.Future, Callable]:
        """Start ``afn(*args, **kwargs)`` as a task; return its future and a function that cancels it."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        scope = trio.CancelScope()

        async def task():
            with scope:
                try:
                    result = await afn(*args, **kwargs)
                except Exception as e:  # noqa: BLE001 - handed to the caller as is
                    fut.set_exception(e)
                    return
                fut.set_result(result)
            if not fut.done():
                fut.set_exception(KeyboardInterrupt("cancelled"))

        def cancel():
            try:
                trio.from_thread.run_sync(scope.cancel, trio_token=self._token)
            except (trio.RunFinishedError, RuntimeError):
                pass

        def start():
            if self._nursery is None:
                raise trio.RunFinishedError("the peer's thread has stopped")
            self._nursery.start_soon(task)
        if not self.running:
            raise RuntimeError("this p2pgrid handle is closed")
        trio.from_thread.run_sync(start, trio_token=self._token)
        return fut, cancel

    def call(self, afn: Callable, *args, **kwargs) -> Any:
        """Run ``afn`` on the trio thread and block until it is done.

        KeyboardInterrupt while waiting (SIGINT) cancels the task, waits for it to
        unwind, and is re-raised here."""
        fut, cancel = self.submit(afn, *args, **kwargs)
        try:
            return _wait(fut)
        except KeyboardInterrupt:
            cancel()
            try:
                concurrent.futures.wait([fut], timeout=_CLOSE_TIMEOUT)
            finally:
                raise KeyboardInterrupt("p2pgrid call cancelled; the peer is still running") from None

    def run_sync(self, fn: Callable, *args, **kwargs) -> Any:
        """Run a plain function on the trio thread (peer state is only touched there)."""
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        return trio.from_thread.run_sync(functools.partial(fn, *args, **kwargs), trio_token=self._token)

    async def call_asyncio(self, afn: Callable, *args, **kwargs) -> Any:
        """Await ``afn`` from an asyncio loop; cancelling the asyncio task cancels the trio task."""
        fut, cancel = self.submit(afn, *args, **kwargs)
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            cancel()
            raise

    def enter(self, cm_factory: Callable[[], Any]) -> tuple[Any, Callable[[], None]]:
        """Enter an async context manager in a task of its own; return (value, exit function)."""
        entered: concurrent.futures.Future = concurrent.futures.Future()
        leave = threading.Event()

        async def holder():
            done = trio.Event()

            def ask_to_leave():
                done.set()
            try:
                async with cm_factory() as value:
                    entered.set_result((value, ask_to_leave))
                    await done.wait()
            except Exception as e:  # noqa: BLE001 - a failed start is the caller's error
                if not entered.done():
                    entered.set_exception(e)
                    return
                raise
            finally:
                leave.set()
                if not entered.done():
                    entered.set_exception(RuntimeError("closed while starting"))

        fut, cancel = self.submit(holder)
        try:
            value, ask = _wait(entered)
        except KeyboardInterrupt:
            cancel()
            raise

        def exit_():
            if self.running:
                try:
                    self.run_sync(ask)
                except (trio.RunFinishedError, RuntimeError):
                    return
                if not leave.wait(_CLOSE_TIMEOUT):
                    cancel()
                    leave.wait(_CLOSE_TIMEOUT)
        return value, exit_

    def close(self) -> None:
        """Cancel every task and end the thread (idempotent)."""
        if self._thread.is_alive() and self._stop is not None:
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except (trio.RunFinishedError, RuntimeError):
                pass
            if threading.current_thread() is not self._thread:
                self._thread.join(_CLOSE_TIMEOUT)
        _bridges.discard(self)


def _wait(fut: concurrent.futures.Future) -> Any:
    # A timed wait in a loop keeps the main thread responsive to SIGINT everywhere.
    while True:
        try:
            return fut.result(timeout=0.2)
        except concurrent.futures.TimeoutError:
            continue


@atexit.register
def _close_all() -> None:
    for bridge in list(_bridges):
        bridge.close()


# ------------------------------------------------------------------ generated proxies

_OPERATORS = (
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__",
    "__rtruediv__", "__floordiv__", "__mod__", "__pow__", "__matmul__", "__rmatmul__",
    "__neg__", "__abs__", "__invert__", "__and__", "__or__", "__lt__", "__le__", "__gt__",
    "__ge__", "__eq__", "__ne__", "__getitem__", "__len__", "__contains__", "__call__",
)


def _is_async_object(obj: Any) -> bool:
    return _is_async_class(type(obj))


@functools.lru_cache(maxsize=None)
def _is_async_class(cls: type) -> bool:
    """Objects worth proxying: anything of ours with coroutine methods or async protocols."""
    if not cls.__module__.startswith("p2pgrid") or cls.__module__.startswith("p2pgrid.protocols") \
            or issubclass(cls, BaseException):  # the protocol logic is sans-IO: nothing to proxy
        return False
    return any(inspect.iscoroutinefunction(getattr(cls, n, None)) or n in ("__aenter__", "__aiter__")
               for n in dir(cls) if not n.startswith("__") or n in ("__aenter__", "__aiter__"))


class _Proxy:
    """The blocking (or asyncio) face of one async object; see the module docstring."""

    __slots__ = ("_target", "_bridge", "_asyncio", "__weakref__")

    def __init__(self, target: Any, bridge: Bridge, asyncio_mode: bool = False):
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_bridge", bridge)
        object.__setattr__(self, "_asyncio", asyncio_mode)

    # --- wrapping and unwrapping
    def _wrap(self, value: Any) -> Any:
        if isinstance(value, _Proxy):
            return value
        if isinstance(value, dict):  # subclasses (SearchResult) keep their type and display
            return type(value)({k: self._wrap(v) for k, v in value.items()})
        if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
            return type(value)(self._wrap(v) for v in value)
        if _is_async_object(value):
            return _Proxy(value, self._bridge, self._asyncio)
        return value

    def _invoke(self, fn: Callable, args: tuple, kwargs: dict) -> Any:
        args, kwargs = _unwrap(args), _unwrap(kwargs)
        if inspect.iscoroutinefunction(fn):
            return self._await(fn, args, kwargs)
        result = self._bridge.run_sync(fn, *args, **kwargs)
        if inspect.iscoroutine(result):  # a plain function that returned a coroutine
            return self._await(lambda *a, **k: result, (), {})
        return self._wrap(result)

    def _await(self, afn: Callable, args: tuple, kwargs: dict) -> Any:
        if self._asyncio:
            async def run():
                return self._wrap(await self._bridge.call_asyncio(afn, *args, **kwargs))
            return run()
        return self._wrap(self._bridge.call(afn, *args, **kwargs))

    # --- attribute access
    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if callable(value) and not isinstance(value, type):
            @functools.wraps(value)
            def method(*args, **kwargs):
                return self._invoke(value, args, kwargs)
            return method
        return self._wrap(value)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._target, name, _unwrap(value))

    def __dir__(self):
        return dir(self._target)

    @property
    def aio(self) -> "_Proxy":
        """The same object with asyncio awaitables instead of blocking calls."""
        return _Proxy(self._target, self._bridge, True)

    def __repr__(self) -> str:
        return repr(self._target)

    def _repr_html_(self) -> str | None:
        fn = getattr(self._target, "_repr_html_", None)
        return fn() if fn else None

    def __bool__(self) -> bool:
        return bool(self._target)

    def __iter__(self):
        if hasattr(self._target, "__aiter__"):
            it = self._target.__aiter__()
            while True:
                try:
                    yield self._wrap(self._bridge.call(it.__anext__))
                except StopAsyncIteration:
                    return
        else:
            yield from (self._wrap(v) for v in self._target)

    def __enter__(self):
        if hasattr(self._target, "__aenter__"):
            return self._wrap(self._bridge.call(self._target.__aenter__))
        return self._wrap(self._target.__enter__())

    def __exit__(self, *exc):
        if hasattr(self._target, "__aexit__"):
            return self._bridge.call(self._target.__aexit__, *exc)
        return self._target.__exit__(*exc)


def _operator(name: str):
    def op(self, *args):
        return self._invoke(getattr(self._target, name), args, {})
    op.__name__ = name
    return op


for _name in _OPERATORS:
    setattr(_Proxy, _name, _operator(_name))
_Proxy.__hash__ = lambda self: hash(self._target)  # type: ignore[assignment]


def _unwrap(value: Any) -> Any:
    if isinstance(value, _Proxy):
        return value._target
    if isinstance(value, dict):
        return {k: _unwrap(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_unwrap(v) for v in value)
    return value


def unwrap(value: Any) -> Any:
    """The async object behind a proxy (for code that wants the trio API)."""
    return _unwrap(value)


class SyncHandle(_Proxy):
    """A proxy that owns its background peer: ``close()`` or ``with`` stops it."""

    __slots__ = ("_exit",)

    def __init__(self, target: Any, bridge: Bridge, exit_: Callable[[], None], asyncio_mode=False):
        super().__init__(target, bridge, asyncio_mode)
        object.__setattr__(self, "_exit", exit_)

    def close(self) -> None:
        """Stop the peer(s) and the background thread; the handle is unusable afterwards."""
        try:
            self._exit()
        finally:
            self._bridge.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    @property
    def closed(self) -> bool:
        return not self._bridge.running


def _start(factory: Callable[[], Any], name: str) -> SyncHandle:
    bridge = Bridge(name)
    try:
        value, exit_ = bridge.enter(factory)
    except BaseException:
        bridge.close()
        raise
    return SyncHandle(value, bridge, exit_)


def connect_sync(name: str, *, join: Iterable[str] = (), **options) -> SyncHandle:
    """Blocking :func:`p2pgrid.connect`: start peer `name` on a background thread.

    Same arguments as :func:`p2pgrid.connect`; returns the :class:`p2pgrid.Network`
    proxied so that its methods block (see :mod:`p2pgrid.sync`). Close it with
    ``net.close()`` or use it as a context manager."""
    from .network import connect
    return _start(lambda: connect(name, join=join, **options), name)


def open_network_sync(names: Iterable, tmp_path=None, **options) -> SyncHandle:
    """Blocking :func:`p2pgrid.testing.open_network`: local peers for examples and tests.

    ``grid.net("bob")`` is that peer's blocking Network; ``grid["hospital"]`` its Peer
    (``publish`` etc. block too). ``grid.close()`` stops them all."""
    from .testing import open_network
    names = list(names)
    return _start(lambda: open_network(names, tmp_path, **options), "grid")


@asynccontextmanager
async def connect_asyncio(name: str, *, join: Iterable[str] = (), **options) -> AsyncIterator[_Proxy]:
    """:func:`p2pgrid.connect` for asyncio programs: ``async with connect_asyncio(...) as net``.

    The peer runs on a background trio thread; ``net``'s async methods are asyncio
    awaitables and never block the loop."""
    loop = asyncio.get_running_loop()
    handle = await loop.run_in_executor(None, functools.partial(connect_sync, name, join=join,
                                                                **options))
    try:
        yield handle.aio
    finally:
        await loop.run_in_executor(None, handle.close)


__all__ = ["Bridge", "SyncHandle", "connect_sync", "connect_asyncio", "open_network_sync", "unwrap"]
