"""One network thread for many MQTT clients in one process, through epoll (`selectors`).

paho's own `loop_start()` runs a thread per client that waits in `select()`, which fails for any
socket numbered above 1023 (FD_SETSIZE): one process cannot hold more than a few hundred clients
that way. `NetLoop` drives every client it is given with paho's external-loop API
(`loop_read`/`loop_write`/`loop_misc` and the socket callbacks), reconnecting lost ones with
exponential backoff as paho's loop does. `edgelearn simulate` uses it for a fleet of 1000 agents in
one process; a device or a coordinator alone keeps paho's loop.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import threading
import time
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt

Socket = Any  # paho's socket: a socket.socket or an ssl.SSLSocket (anything with fileno())

log = logging.getLogger(__name__)
RW = selectors.EVENT_READ | selectors.EVENT_WRITE


@dataclass
class _Peer:
    retry_at_s: float = 0.0  # monotonic time of the next connection attempt
    delay_s: float = 1.0  # backoff: 1 s, doubling up to max_delay_s


class NetLoop:
    """Drives the clients added with `add` until they are `remove`d; `tick_s` is the keep-alive cadence."""

    def __init__(self, tick_s: float = 0.5, max_delay_s: float = 30.0) -> None:
        self.tick_s, self.max_delay_s = tick_s, max_delay_s
        self.sel = selectors.DefaultSelector()
        self.peers: dict[mqtt.Client, _Peer] = {}
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="mqtt-netloop", daemon=True)
        self.thread.start()

    def add(self, client: mqtt.Client) -> None:
        """Take over `client` (after its `connect_async`): it connects on this loop's thread."""
        client.on_socket_open = lambda c, _u, sock: self._watch(c, sock, selectors.EVENT_READ)
        client.on_socket_close = lambda _c, _u, sock: self._unwatch(sock)
        client.on_socket_register_write = lambda c, _u, sock: self._watch(c, sock, RW)
        # paho's "unregister write" races with a publish on another thread (its flag says registered while
        # the socket is watched for reads only, and every later packet waits for a keep-alive timeout), so
        # this loop drops write interest itself, after each write, when paho has nothing left to send.
        client.on_socket_unregister_write = lambda _c, _u, _sock: None
        with self.lock:
            self.peers[client] = _Peer()

    def remove(self, client: mqtt.Client) -> None:
        """Stop reconnecting `client`; its socket stays watched until paho closes it (after DISCONNECT)."""
        with self.lock:
            self.peers.pop(client, None)

    def _watch(self, client: mqtt.Client, sock: Socket, events: int) -> None:
        try:
            self.sel.modify(sock, events, client)
        except (KeyError, ValueError):
            with contextlib.suppress(KeyError, ValueError, OSError):  # OSError: closed meanwhile
                self.sel.register(sock, events, client)

    def _settle(self, client: mqtt.Client, sock: Socket) -> None:
        """Watch for writes only while paho has packets queued. A publish racing with this (on another
        thread) either sees its register callback run after the READ below, or is seen by the re-check."""
        if not client.want_write():
            self._watch(client, sock, selectors.EVENT_READ)
            if client.want_write():
                self._watch(client, sock, RW)

    def _unwatch(self, sock: Socket) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(sock)

    def _run(self) -> None:
        next_misc = 0.0
        while True:
            try:
                events = self.sel.select(timeout=self.tick_s)
            except OSError:
                log.exception("network loop select failed")
                time.sleep(self.tick_s)
                continue
            for key, mask in events:
                self._serve(key.data, key.fileobj, mask)
            now = time.monotonic()
            if now >= next_misc:
                next_misc = now + self.tick_s
                self._housekeeping(now)

    def _serve(self, client: mqtt.Client, sock: object, mask: int) -> None:
        """Read and write for one ready socket; a failure is this client's alone (logged)."""
        try:
            if mask & selectors.EVENT_READ:
                client.loop_read()
                while _tls_pending(client.socket()):  # bytes TLS already decrypted: epoll will not see them
                    client.loop_read()
            if mask & selectors.EVENT_WRITE and client.socket() is sock:
                client.loop_write()
                self._settle(client, sock)
        except Exception:  # one client's failure must not stop the others' network
            log.exception("network loop error")

    def _housekeeping(self, now: float) -> None:
        """Keep-alive pings for connected clients; (re)connect the others when their backoff has passed."""
        with self.lock:
            peers = list(self.peers.items())
        for client, peer in peers:
            try:
                if client.loop_misc() != mqtt.MQTT_ERR_NO_CONN or now < peer.retry_at_s:
                    if client.is_connected():
                        peer.delay_s = 1.0
                    continue
                with self.lock:
                    if client not in self.peers:  # stopped meanwhile: never reconnect it
                        continue
                client.reconnect()
            except Exception as e:  # OSError and anything else (a bad host name): this client's alone
                log.info("connection attempt failed (%s); next in %.0fs", e, peer.delay_s)
            peer.retry_at_s = now + peer.delay_s
            peer.delay_s = min(2 * peer.delay_s, self.max_delay_s)


def _tls_pending(sock: object) -> bool:
    """True when an SSL socket holds decrypted bytes not yet read (plain sockets have no `pending`)."""
    pending = getattr(sock, "pending", None)
    return bool(pending and pending() > 0)


_shared: NetLoop | None = None
_shared_lock = threading.Lock()


def shared() -> NetLoop:
    """The process's one NetLoop (started on first use)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = NetLoop()
        return _shared
