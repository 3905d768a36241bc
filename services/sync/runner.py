"""Run the sync consumer as a service: model, store, /metrics, signals.

Shared by ``python -m services.sync`` (the systemd unit) and ``dualtrack sync run``.
The knowledge base may come up after the consumer (both start at boot), so the
store is retried until it answers or the process is told to stop.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import start_http_server

from services.config import Settings
from services.kb.errors import KBError
from services.kb.service import KnowledgeBase
from services.sync.consumer import SyncConsumer
from services.sync.kafka import client_config
from services.sync.metrics import ConsumerMetrics

log = logging.getLogger(__name__)


def run(settings: Settings, stop: threading.Event | None = None) -> None:
    """Consume until SIGTERM/SIGINT (or ``stop``); raises ``KBError`` if the model cannot load."""
    stop = stop or threading.Event()
    client_config(settings.sync)  # a missing broker setting fails now, not after the model loads
    kb = KnowledgeBase(settings)
    kb.load_model()
    kb.embedder  # noqa: B018 -- raises the model's load error, if any
    delay = 1.0
    while not stop.is_set():
        try:
            kb.store.connect()
            break
        except KBError as exc:
            log.warning("knowledge base not ready (%s); retrying in %.0fs", exc, delay)
            stop.wait(delay)
            delay = min(delay * 2, 30.0)
    metrics = ConsumerMetrics()
    with _signals(stop), _metrics_server(settings, metrics):
        try:
            SyncConsumer(settings, kb, metrics).run(stop)
        finally:
            kb.close()
    log.info("sync consumer stopped")


@contextmanager
def _signals(stop: threading.Event) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, lambda *_: stop.set())
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def _metrics_server(settings: Settings, metrics: ConsumerMetrics) -> Iterator[None]:
    if not settings.sync.metrics_port:
        yield
        return
    server, thread = start_http_server(
        settings.sync.metrics_port, addr=settings.sync.metrics_host, registry=metrics.registry
    )
    log.info("metrics on http://%s:%d/metrics", settings.sync.metrics_host, settings.sync.metrics_port)
    try:
        yield
    finally:
        server.shutdown()
        thread.join(5)
