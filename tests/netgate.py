"""A TCP gate for tests: a loopback port that forwards to another until it is cut (a site's uplink going down)."""

from __future__ import annotations

import contextlib
import socket
import threading

from edgelearn.broker import free_port


class TcpGate:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target`. `cut()` drops every connection and refuses new ones
    (connection refused, as a dead uplink); `restore()` listens again on the same port."""

    def __init__(self, target: int) -> None:
        self.target, self.port = target, free_port()
        self.lock = threading.Lock()
        self.socks: list[socket.socket] = []
        self.server: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(16)
        self.server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self.lock:
            if self.server is not None:
                with contextlib.suppress(OSError):
                    self.server.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked on it
                self.server.close()
                self.server = None
            for s in self.socks:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self.socks = []

    def close(self) -> None:
        self.cut()
