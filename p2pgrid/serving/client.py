"""The caller's side: route an inference to a live replica, download a model.

Routing picks the host expected to answer first (:class:`~.routing.Routes`); a host
that does not answer (stopped, unreachable, gone mid-request) is marked down and the
request goes to the next one. Inference is a pure function of the input, so a retry
never changes the answer; a host that refuses (bad input, rate limit, not on the
list) answered, and its refusal is the answer.
"""

from __future__ import annotations

import time

import torch
import trio
from torch import nn

from ..errors import Conflict, NotFound, PeerUnavailable, PermissionDenied
from .catalog import ModelInfo, find, refusal
from .host import Serving
from .messages import GetManifest, Infer, Manifest, Prediction
from .package import Digests
from .transfer import ATTEMPTS, PartFile, TransferReport, download, request


async def run_inference(s: Serving, name: str, x: torch.Tensor, *, owner: str | None = None,
                        timeout: float | None = None):
    info = find(s.peer.directory, name, owner)
    if not info.allow_remote_inference and info.owner != s.peer.name:
        raise PermissionDenied(refusal(f"{info.owner}/{info.name}", "inference", mpc=bool(info.mpc),
                                       allow_remote_inference=False), model=info.name)
    reply = await _routed(s, info, lambda: Infer(info.owner, info.name, x), timeout)
    if not isinstance(reply, Prediction):
        raise PeerUnavailable(f"a host of {info.owner}/{info.name} answered with something "
                              f"other than a prediction")
    return reply.y


async def _routed(s: Serving, info: ModelInfo, make_msg, timeout: float | None):
    """Send to the best host and return its reply; on PeerUnavailable (or a host that lost
    the model) try the next."""
    model = f"{info.owner}/{info.name}"
    tried: set[str] = set()
    last: Exception | None = None
    while True:
        hosts = [h for h in info.hosts if h not in tried]
        if not hosts:
            if last is None:
                raise PeerUnavailable(f"no live host serves {model}")
            raise PeerUnavailable(f"every host of {model} failed; last: {last}") from None
        host = s.routes.pick(hosts, model)
        ticket = s.routes.start(host, model)
        outcome = "refused"
        try:
            reply = await request(s.peer, host, make_msg(), timeout=timeout)
            outcome = "ok"
        except PeerUnavailable as e:
            outcome, last = "down", e
            tried.add(host)
            continue
        except NotFound as e:  # the host dropped its replica since it announced it
            outcome, last = "lost", e
            tried.add(host)
            continue
        finally:
            s.routes.done(ticket, ok=outcome != "down", measure=outcome == "ok")
        return reply


async def download_model(s: Serving, name: str, *, owner: str | None = None,
                         attempts: int = ATTEMPTS, on_chunk=None,
                         progress: bool = False) -> tuple[nn.Module, TransferReport]:
    """Fetch a downloadable model's package from its hosts, check it, build it. With
    `progress`, a tqdm bar of the bytes (a widget in Jupyter, text in a terminal)."""
    info = find(s.peer.directory, name, owner)
    model = f"{info.owner}/{info.name}"
    if not info.allow_download and info.owner != s.peer.name:
        raise PermissionDenied(refusal(model, "download", mpc=bool(info.mpc),
                                       allow_remote_inference=info.allow_remote_inference),
                               model=info.name)
    manifest = await _routed(s, info, lambda: GetManifest(info.owner, info.name), None)
    if not isinstance(manifest, Manifest) or manifest.hash != info.hash:
        raise Conflict(f"the host's manifest of {model} does not match the announced hash")
    digests = Digests.from_dict(manifest.digests)
    part = PartFile(s.dir("downloads") / f"{info.hash[:32]}.part", digests)
    await trio.to_thread.run_sync(part.open)
    hosts = list(info.hosts)

    def pick() -> str:
        return s.routes.pick(hosts, model)

    def report_host(host: str, ok: bool) -> None:
        s.routes.done(s.routes.start(host, model), ok=ok, measure=False)

    from tqdm.auto import tqdm
    bar = tqdm(total=digests.size, initial=sum(digests.span(i)[1] for i in part.have), unit="B",
               unit_scale=True, desc=f"download {model}", disable=not progress, dynamic_ncols=True)

    def counted(i: int):
        bar.update(digests.span(i)[1])
        return None if on_chunk is None else on_chunk(i)

    t0 = time.perf_counter()
    try:
        report = await download(s.peer, pick, report_host, info.owner, info.name, info.hash, part,
                                attempts=attempts, on_chunk=counted)
    finally:
        bar.close()
    await trio.to_thread.run_sync(part.complete)
    module = await s.build(part.path, info.hash)
    part.path.unlink(missing_ok=True)
    report.seconds = time.perf_counter() - t0
    return module, report
