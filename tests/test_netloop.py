"""One epoll network thread for many MQTT links (edgelearn/netloop.py), against a real mosquitto."""

from __future__ import annotations

import contextlib
import os
import queue
import resource
import time

from edgelearn.broker import Mosquitto
from edgelearn.mqtt import MqttLink
from edgelearn.netloop import NetLoop


def link(url: str, name: str, net: NetLoop, inbox: queue.Queue | None = None) -> MqttLink:
    on_message = (lambda t, p: inbox.put((t, p))) if inbox is not None else (lambda t, p: None)
    return MqttLink(url, f"netloop-{name}", [f"nl/{name}"] if inbox is not None else [], on_message, net=net)


def test_links_beyond_select_limit_exchange_messages_and_survive_a_broker_restart(tmp_path) -> None:
    # Prepare: push this process's descriptors past FD_SETSIZE (1024), where paho's select() loop fails
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 4096), hard), hard))
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    broker = Mosquitto(tmp_path / "broker").start()
    net, inbox = NetLoop(tick_s=0.1), queue.Queue()
    rx, tx = link(broker.url, "rx", net, inbox), link(broker.url, "tx", net)
    try:
        # Execute: connect both, send one message; then restart the broker and send another
        assert rx.start(wait_s=10) and tx.start(wait_s=10)
        assert rx.client.socket().fileno() > 1024
        tx.publish("nl/rx", b"one")
        first = inbox.get(timeout=10)
        broker.kill()
        deadline = time.monotonic() + 10
        while (rx.connected.is_set() or tx.connected.is_set()) and time.monotonic() < deadline:
            time.sleep(0.05)
        lost = not rx.connected.is_set() and not tx.connected.is_set()
        broker.start()
        assert rx.connected.wait(15) and tx.connected.wait(15)
        tx.publish("nl/rx", b"two")
        second = inbox.get(timeout=20)
        while second == first:  # QoS 1 is at least once: the restarted broker may redeliver "one" (unacked at the kill)
            second = inbox.get(timeout=20)
        # Assert: both links noticed the loss and reconnected; both messages arrived, in order
        assert lost
        assert (first, second) == (("nl/rx", b"one"), ("nl/rx", b"two"))
    finally:
        rx.stop()
        tx.stop()
        broker.stop()
        for fd in filler:
            os.close(fd)


def test_publishes_from_many_threads_are_all_sent_at_once(mosquitto) -> None:
    # Prepare: two links on one loop; four threads publish at once while the loop thread writes
    import threading

    net, inbox = NetLoop(tick_s=0.1), queue.Queue()
    rx, tx = link(mosquitto.url, "race-rx", net, inbox), link(mosquitto.url, "race-tx", net)
    try:
        assert rx.start(wait_s=10) and tx.start(wait_s=10)

        def burst(k: int) -> None:
            for i in range(500):
                tx.publish("nl/race-rx", f"{k}-{i}".encode())
                time.sleep(0.0002)  # the loop thread drains the queue in between: many register/unregister turns

        # Execute
        threads = [threading.Thread(target=burst, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        got = set()
        deadline = time.monotonic() + 10  # far below the 30 s keep-alive that would flush a stuck queue
        while len(got) < 2000 and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                got.add(inbox.get(timeout=0.5)[1])
        # Assert: every message arrived promptly, none waited for a keep-alive ping
        assert len(got) == 2000
    finally:
        rx.stop()
        tx.stop()


def test_a_client_that_cannot_even_resolve_its_host_does_not_stop_the_others(mosquitto) -> None:
    # Prepare: one link whose host name is invalid (a 300-character label: idna raises UnicodeError, not OSError)
    net, inbox = NetLoop(tick_s=0.05), queue.Queue()
    bad = MqttLink("mqtt://" + "h" * 300 + ":1883", "netloop-bad", [], lambda t, p: None, net=net)
    bad.start(wait_s=0)
    time.sleep(0.3)  # a few housekeeping rounds with the failing client first in line
    rx, tx = link(mosquitto.url, "after-bad-rx", net, inbox), link(mosquitto.url, "after-bad-tx", net)
    try:
        # Execute
        ok = rx.start(wait_s=10) and tx.start(wait_s=10)
        tx.publish("nl/after-bad-rx", b"hi")
        got = inbox.get(timeout=10)
        # Assert: the healthy links connect and exchange a message
        assert ok and got == ("nl/after-bad-rx", b"hi")
    finally:
        for x in (rx, tx, bad):
            with contextlib.suppress(Exception):
                x.stop()
