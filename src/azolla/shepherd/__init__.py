"""The shepherd: connects to an orchestrator and runs the attempts it pushes.

* :class:`~azolla.shepherd.runtime.ShepherdRuntime` — the connection and attempt life cycle
  (Hello, batched results, lazy acks, heartbeats, cancel, reconnect, drain);
* :mod:`azolla.shepherd.connection` — orchestrator URL, gRPC channel and stream;
* :mod:`azolla.shepherd.settings` — settings from flags, ``AZOLLA_*`` variables and TOML.

The ``azolla-shepherd`` command (:mod:`azolla.app.shepherd_main`) and the programmatic
:class:`azolla.Worker` are built on these. See ``docs/shepherd.md``.
"""

from __future__ import annotations

from azolla.shepherd.connection import ConnectionOptions, GrpcConnector
from azolla.shepherd.runtime import RuntimeConfig, RuntimeState, ShepherdRuntime

__all__ = [
    "ConnectionOptions",
    "GrpcConnector",
    "RuntimeConfig",
    "RuntimeState",
    "ShepherdRuntime",
]
