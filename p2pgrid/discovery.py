"""mDNS/DNS-SD discovery of peers on the local network (zeroconf, bridged to trio).

A peer advertises itself as ``<name>-<key id prefix>._p2pgrid._tcp.local.`` with TXT
``name``, ``key_id``, ``port`` and ``proto``, browses for the same type, and hands every
peer it resolves to ``on_found("host:port", txt)``; the gossip loop takes these as seed
addresses. What mDNS says is a hint, never trusted: the peer's signed directory record,
fetched over the authenticated transport, is what binds a name to a key.

zeroconf runs its own thread and event loop. Nothing here blocks trio: the Zeroconf
instance is built, registered, unregistered and closed in worker threads
(``trio.to_thread``); the browser's handler, called on zeroconf's thread, only posts
the service name to trio (``TrioToken.run_sync_soon``), and a trio task resolves it in
a worker thread. IPv4 only.
"""

from __future__ import annotations

import logging
import math
import socket
from collections.abc import Callable

import trio
from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

__all__ = ["SERVICE_TYPE", "PROTO", "instance_name", "run_discovery"]

log = logging.getLogger("p2pgrid.discovery")

SERVICE_TYPE = "_p2pgrid._tcp.local."
PROTO = "p2pgrid/1"
_RESOLVE_MS = 3000
_CLOSE_DEADLINE = 5.0


def instance_name(name: str, key_id: str) -> str:
    """DNS-SD instance label: the peer name (dots dropped, cut to fit 63 bytes) + 8 hex of key id."""
    suffix = "-" + key_id[:8]
    label = name.replace(".", "-")
    while len((label + suffix).encode()) > 63:
        label = label[:-1]
    return label + suffix


def _advertised_addresses(interfaces: list[str] | None) -> list[str]:
    """IPv4 addresses to put in our A records: the interfaces we listen on, or all of them."""
    if interfaces:
        ips = [i for i in interfaces if _is_ipv4(i) and i != "0.0.0.0"]
        if ips:
            return ips
    from .config import interface_ipv4s

    return interface_ipv4s()


def _is_ipv4(s: str) -> bool:
    try:
        socket.inet_aton(s)
        return s.count(".") == 3
    except OSError:
        return False


def _txt(info: ServiceInfo) -> dict[str, str]:
    out = {}
    for k, v in (info.properties or {}).items():
        key = k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k)
        out[key] = v.decode("utf-8", "replace") if isinstance(v, bytes) else ("" if v is None else str(v))
    return out


async def run_discovery(*, name: str, key_id: str, port: int,
                        interfaces: list[str] | None,
                        on_found: Callable[[str, dict], None],
                        on_lost: Callable[[str, dict], None] | None = None,
                        proto: str = PROTO, announce: bool = True,
                        task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Advertise this peer (unless `announce` is False: a peer that does not listen)
    and report others until cancelled.

    ``interfaces``: IPv4 addresses to run mDNS on (None: every interface). Reports
    started once registered and browsing. ``on_found(address, txt)`` is called on the
    trio thread for each address of each peer resolved (again when its TXT changes),
    never for ourselves (same key id); ``on_lost`` when a peer says goodbye.
    """
    token = trio.lowlevel.current_trio_token()
    send_ch, recv_ch = trio.open_memory_channel[tuple[str, ServiceStateChange]](math.inf)

    def post(item) -> None:  # on the trio thread
        try:
            send_ch.send_nowait(item)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def handler(zeroconf, service_type, name, state_change) -> None:  # on zeroconf's thread
        try:
            token.run_sync_soon(post, (name, state_change))
        except trio.RunFinishedError:
            pass

    def start() -> tuple[Zeroconf, ServiceInfo | None, ServiceBrowser]:
        zc = Zeroconf(interfaces=interfaces if interfaces else _all_interfaces(),
                      ip_version=IPVersion.V4Only)
        try:
            info = None
            if announce:
                instance = instance_name(name, key_id)
                info = ServiceInfo(
                    SERVICE_TYPE, f"{instance}.{SERVICE_TYPE}", port=port,
                    properties={"name": name, "key_id": key_id, "port": str(port),
                                "proto": proto},
                    server=f"p2pgrid-{key_id}.local.",
                    parsed_addresses=_advertised_addresses(interfaces))
                zc.register_service(info, allow_name_change=True)
            browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[handler])
        except BaseException:
            zc.close()
            raise
        return zc, info, browser

    def stop(zc: Zeroconf, info: ServiceInfo | None, browser: ServiceBrowser) -> None:
        try:
            browser.cancel()
            if info is not None:
                zc.unregister_service(info)
        finally:
            zc.close()

    known: dict[str, tuple[list[str], dict]] = {}  # instance -> (addresses, txt)

    async def resolve(zc: Zeroconf, instance: str) -> None:
        info = await trio.to_thread.run_sync(
            zc.get_service_info, SERVICE_TYPE, instance, _RESOLVE_MS, abandon_on_cancel=True)
        if info is None:
            log.debug("mDNS: could not resolve %s", instance)
            return
        txt = _txt(info)
        if txt.get("key_id") == key_id:
            return  # ourselves
        txt.setdefault("instance", instance)
        addresses = [f"{ip}:{info.port}" for ip in info.parsed_addresses(IPVersion.V4Only)]
        known[instance] = (addresses, txt)
        for address in addresses:
            log.debug("mDNS: found %s at %s", txt.get("name", instance), address)
            on_found(address, dict(txt))

    zc, info, browser = await trio.to_thread.run_sync(start)
    if info is not None:
        log.info("mDNS: advertising %s on port %d", info.name, port)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            async with recv_ch:
                async for instance, change in recv_ch:
                    if change in (ServiceStateChange.Added, ServiceStateChange.Updated):
                        nursery.start_soon(resolve, zc, instance)
                    elif change is ServiceStateChange.Removed and instance in known:
                        addresses, txt = known.pop(instance)
                        if on_lost is not None:
                            for address in addresses:
                                on_lost(address, dict(txt))
    finally:
        send_ch.close()
        with trio.CancelScope(shield=True):
            with trio.move_on_after(_CLOSE_DEADLINE):
                await trio.to_thread.run_sync(stop, zc, info, browser, abandon_on_cancel=True)


def _all_interfaces():
    from zeroconf import InterfaceChoice

    return InterfaceChoice.All
