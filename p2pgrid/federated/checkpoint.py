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
>>> cps.save("job-2", {"round": 1, "history": [{"round": 1, "loss": 0.5}]})
>>> cps.histories()
{'job-2': [{'round': 1, 'loss': 0.5}]}
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
        _write(self.path(job), {"format": FORMAT, **state})
        if "history" in state:  # read back by the peer's page without loading the model
            _write(self.root / f"{check_job(job)}.history.cbor",
                   {"format": FORMAT, "job": job, "history": state["history"]})

    def histories(self, newest: int = 6) -> dict[str, list[dict]]:
        """job -> round records of the `newest` jobs that saved a history (oldest first);
        unreadable files are skipped."""
        files = sorted(self.root.glob("*.history.cbor"), key=lambda p: p.stat().st_mtime) \
            if self.root.is_dir() else []
        out = {}
        for path in files[-newest:]:
            try:
                data = wire.loads(path.read_bytes())
                if data.get("format") == FORMAT and isinstance(data.get("history"), list):
                    out[check_job(data["job"])] = data["history"]
            except Exception:  # noqa: BLE001 - a damaged page record must not stop the peer
                continue
        return out

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
        (self.root / f"{check_job(job)}.history.cbor").unlink(missing_ok=True)


def _write(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(wire.dumps(obj))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
