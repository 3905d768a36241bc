"""A TCP proxy that records every byte a client sends through it: put in front of the cloud
model, it is what "the cloud side received" means in the leak suite (headers, bodies, retries,
health probes and all), independent of how the model server parses them."""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path

from tests.support import free_port


class RecordingProxy:
    def __init__(self, upstream_port: int, record: Path) -> None:
        self.upstream_port = upstream_port
        self.record = record
        self.port = free_port()
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="recording-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RecordingProxy:
        self.record.parent.mkdir(parents=True, exist_ok=True)
        self.record.write_bytes(b"")
        self._thread.start()
        return self

    def received(self) -> bytes:
        with self._lock:
            return self.record.read_bytes()

    def _accept(self) -> None:
        self._server.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        except OSError:
            client.close()
            return
        back = threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True)
        back.start()
        self._pipe(client, upstream, True)
        back.join(timeout=5)

    def _pipe(self, src: socket.socket, dst: socket.socket, recorded: bool) -> None:
        try:
            while data := src.recv(65536):
                if recorded:
                    with self._lock, self.record.open("ab") as out:
                        out.write(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def stop(self) -> None:
        self._stop.set()
        self._server.close()
        self._thread.join(timeout=5)
