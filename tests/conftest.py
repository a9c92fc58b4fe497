"""Fixtures shared by the test modules: one torch thread, a started tiny server, and its client.

- ``one_thread``: module-scoped; tiny models run far faster on one torch thread on a busy small
  box. Opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``; the previous thread
  count is restored afterwards.
- ``start_server``: module-scoped factory ``start_server(engine=None, *, jobs=False, **ServerConfig fields)``
  that starts a `ThreadedServer` on a free 127.0.0.1 port with its own data directory (the tiny
  engine of `tiny.build_engine` when no engine is given; jobs off unless ``jobs=True``) and stops
  every server it started when the module ends. A module's ``server`` fixture is one call of it.
- ``client``: an `AuditClient` connected to the module's ``server`` fixture.

The model builders live in `tiny.py` (random tiny models, `build_engine`) and `planted.py` (the
model with planted refusal latents).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Any]]:
    from refusal_audit.server.app import ThreadedServer
    from refusal_audit.server.config import ServerConfig
    from tiny import build_engine, no_jobs

    started: list[ThreadedServer] = []

    def start(engine: Any = None, *, jobs: bool = False, **config: Any) -> ThreadedServer:
        config.setdefault("model", "tiny-llama")
        config.setdefault("host", "127.0.0.1")
        config.setdefault("port", 0)
        config.setdefault("data_dir", tmp_path_factory.mktemp("server"))
        srv = ThreadedServer(ServerConfig(**config), engine if engine is not None else build_engine(),
                             jobs_factory=None if jobs else no_jobs)
        started.append(srv.start())
        return srv

    yield start
    for srv in reversed(started):
        srv.stop()


@pytest.fixture(scope="module")
def client(server: Any) -> Iterator[Any]:
    from refusal_audit.client import AuditClient

    with AuditClient(server.address, timeout=120) as c:
        yield c
