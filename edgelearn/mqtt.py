"""The narrow MQTT edge: one paho client set up as protocol v1 asks (MQTT 5, persistent session, Last Will, QoS 1).

Callers get `(topic, payload)` callbacks on paho's network thread and should hand
them to their own loop (a queue); nothing else of paho leaks out of this module.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgelearn import netloop
from edgelearn.protocol import QOS, parse_broker_url

log = logging.getLogger(__name__)
DEFAULT_SESSION_EXPIRY_S = 7 * 24 * 3600
_shared_loop = False


def use_shared_loop() -> None:
    """Links started after this call (in this process) share one epoll network thread (`edgelearn.netloop`)
    instead of a paho thread each: needed beyond a few hundred links, where paho's select() fails."""
    global _shared_loop
    _shared_loop = True


class MqttLink:
    """One MQTT connection that re-subscribes on every (re)connect and reports messages to `on_message`."""

    def __init__(
        self,
        url: str,
        client_id: str,
        subscriptions: list[str],
        on_message: Callable[[str, bytes], None],
        will: tuple[str, bytes] | None = None,
        session_expiry_s: int = DEFAULT_SESSION_EXPIRY_S,
        mqtt_v311: bool = False,
        keepalive_s: int = 30,
        on_connected: Callable[[], None] | None = None,
        net: netloop.NetLoop | None = None,
    ) -> None:
        self.broker = parse_broker_url(url)
        self.subscriptions = subscriptions
        self.on_message = on_message
        self.on_connected = on_connected
        self.session_expiry_s = session_expiry_s
        self.keepalive_s = keepalive_s
        self.v5 = not mqtt_v311
        self.connected = threading.Event()
        self.net = net  # None: paho's own thread (or the shared NetLoop after `use_shared_loop()`)
        self.max_packet_bytes: int | None = None
        proto = mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311
        kwargs: dict[str, Any] = {} if self.v5 else {"clean_session": False}
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=proto, **kwargs)
        if self.broker.username:
            self.client.username_pw_set(self.broker.username, self.broker.password)
        if self.broker.tls:  # hostname checked against the broker's certificate
            b = self.broker
            self.client.tls_set(ca_certs=b.cafile, certfile=b.certfile, keyfile=b.keyfile)
        if will:
            self.client.will_set(will[0], will[1], qos=QOS, retain=True)
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object) -> None:
        if getattr(rc, "is_failure", False):
            log.warning("broker refused the connection: %s", rc)
            return
        if props is not None and hasattr(props, "MaximumPacketSize"):
            self.max_packet_bytes = int(props.MaximumPacketSize)
        for topic in self.subscriptions:
            client.subscribe(topic, qos=QOS)
        self.connected.set()
        if self.on_connected:
            self.on_connected()
        log.debug("connected to %s:%s", self.broker.host, self.broker.port)

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object) -> None:
        self.connected.clear()
        log.info("disconnected from broker (%s); paho reconnects", rc)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        try:
            self.on_message(msg.topic, bytes(msg.payload))
        except Exception:  # a handler bug must not kill paho's network thread
            log.exception("message handler failed on %s", msg.topic)

    def start(self, wait_s: float = 10.0) -> bool:
        """Connect in the background (paho retries forever); True once connected within `wait_s`."""
        props = None
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.session_expiry_s
            self.client.connect_async(
                self.broker.host, self.broker.port, self.keepalive_s, clean_start=False, properties=props
            )
        else:
            self.client.connect_async(self.broker.host, self.broker.port, self.keepalive_s)
        if self.net is None and _shared_loop:
            self.net = netloop.shared()
        if self.net is not None:
            self.net.add(self.client)
        else:
            self.client.loop_start()
        return self.connected.wait(wait_s)

    def subscribe(self, topic: str) -> None:
        """Subscribe now and on every reconnect (a retained message on `topic` arrives at once)."""
        if topic not in self.subscriptions:
            self.subscriptions = [*self.subscriptions, topic]
        self.client.subscribe(topic, qos=QOS)

    def unsubscribe(self, topic: str) -> None:
        if topic in self.subscriptions:
            self.subscriptions = [t for t in self.subscriptions if t != topic]
            self.client.unsubscribe(topic)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> bool:
        """Queue a QoS 1 publish; False when not sent (too large for the broker, or paho refused it)."""
        if self.max_packet_bytes and len(payload) + len(topic) + 64 > self.max_packet_bytes:
            log.error(
                "message of %d bytes for %s exceeds the broker's %d-byte limit",
                len(payload),
                topic,
                self.max_packet_bytes,
            )
            return False
        info = self.client.publish(topic, payload, qos=QOS, retain=retain)
        return info.rc == mqtt.MQTT_ERR_SUCCESS or info.rc == mqtt.MQTT_ERR_NO_CONN

    def stop(self, final_status: tuple[str, bytes] | None = None) -> None:
        """Publish `final_status` (retained) if connected, then disconnect cleanly and stop paho's thread."""
        if final_status and self.connected.is_set():
            info = self.client.publish(final_status[0], final_status[1], qos=QOS, retain=True)
            with contextlib.suppress(RuntimeError):
                info.wait_for_publish(timeout=2.0)
        if self.net is not None:
            self.net.remove(self.client)  # the loop thread still sends DISCONNECT, then paho closes the socket
            self.client.disconnect()
            return
        self.client.disconnect()
        self.client.loop_stop()
