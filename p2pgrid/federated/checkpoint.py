"""The coordinator's checkpoints: one CBOR file per job in its data dir, no pickle.

A checkpoint holds the round last completed, the global model as a
:mod:`p2pgrid.modelgraph` spec (structure and weights), the history, the
strategy's state (FedAdam's moments) and the DP accountant's steps. It is written
to a temporary file and renamed, so a crash leaves the previous one whole; loading
goes through the wire decoder (tensors as typed arrays), and the model spec is
checked against the whitelist before its weights are used.

>>> import tempfile, pathlib, torch
>>> cps = Checkpoints(pathlib.Path(tempfile.mkdtemp()))
>>> cps.save("job-1", {"round": 2, "w": torch.ones(2)})
>>> cps.load("job-1")["round"], cps.load("nothing")
(2, None)
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .. import wire
from ..errors import BadRequest

__all__ = ["Checkpoints"]

FORMAT = "p2pgrid.federated.checkpoint/1"
_JOB = re.compile(r"[A-Za-z0-9_.-]{1,80}")


def check_job(job: str) -> str:
    if not isinstance(job, str) or not _JOB.fullmatch(job) or job.startswith("."):
        raise BadRequest("a job name is 1-80 characters of [A-Za-z0-9_.-], not starting with '.'")
    return job


class Checkpoints:
    """Checkpoints under `root` (``<data_dir>/federated/jobs`` for a peer)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, job: str) -> Path:
        return self.root / f"{check_job(job)}.ckpt.cbor"

    def save(self, job: str, state: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.path(job)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(wire.dumps({"format": FORMAT, **state}))
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)

    def load(self, job: str) -> dict | None:
        path = self.path(job)
        if not path.exists():
            return None
        data = wire.loads(path.read_bytes())
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise BadRequest(f"{path} is not a federated checkpoint")
        return data

    def delete(self, job: str) -> None:
        self.path(job).unlink(missing_ok=True)
