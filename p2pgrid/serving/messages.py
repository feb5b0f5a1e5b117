"""Wire messages of model serving (registered in :mod:`p2pgrid.wire` as ``serving.*``).

A model is named ``(owner, name)``; requests carry both so a host holding models of
two owners under one name serves the right one.
"""

from __future__ import annotations

from typing import Any

import torch

from ..wire import dataclass, message


@message("serving.infer")
@dataclass(frozen=True)
class Infer:
    """Run the model on `x` under its policy."""
    owner: str
    model: str
    x: torch.Tensor


@message("serving.prediction")
@dataclass(frozen=True)
class Prediction:
    y: Any  # a tensor, or a list of tensors for models with several outputs
    host: str = ""


@message("serving.manifest?")
@dataclass(frozen=True)
class GetManifest:
    """Ask for a model's package digests, to download it (needs the download right)."""
    owner: str
    model: str


@message("serving.manifest")
@dataclass(frozen=True)
class Manifest:
    owner: str
    model: str
    hash: str        # model_hash of the model
    digests: dict    # package.Digests.to_dict(): size, sha256, chunk_size, chunk sha256s


@message("serving.chunk?")
@dataclass(frozen=True)
class GetChunk:
    owner: str
    model: str
    hash: str
    index: int


@message("serving.chunk")
@dataclass(frozen=True)
class Chunk:
    index: int
    data: bytes


@message("serving.offer")
@dataclass(frozen=True)
class HostOffer:
    """The owner asks the receiving peer to host a replica. The reply is an UploadState
    (what the host already holds of this package) or a refusal."""
    model: str
    hash: str
    digests: dict
    terms: dict      # host.Terms.to_dict(): flags and policy
    grant: bytes     # the owner's signature of catalog.grant_bytes(...) for this host


@message("serving.put")
@dataclass(frozen=True)
class PutChunk:
    model: str
    hash: str
    index: int
    data: bytes


@message("serving.upload")
@dataclass(frozen=True)
class UploadState:
    have: list[int]  # chunk indexes the host holds, verified
    count: int       # chunks in the package


@message("serving.commit")
@dataclass(frozen=True)
class CommitUpload:
    """All chunks are in: check the whole file, build the model, start serving it."""
    model: str
    hash: str


@message("serving.hosted")
@dataclass(frozen=True)
class Hosted:
    model: str
    host: str
    hash: str


@message("serving.drop")
@dataclass(frozen=True)
class DropReplica:
    """From the owner: stop serving this model and delete its copy."""
    model: str
