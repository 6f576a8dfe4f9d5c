"""The coordinator's view of its site relays (protocol v1.4): each relay's last retained status, kept in the state.

A relay publishes its status (round, devices online at the site, unsent updates, parts not yet acked) up its
site's bridge; the coordinator keeps the last one per relay in its store, where `edgelearn fleet status` and the
dashboard read it.
"""

from __future__ import annotations

import json
import logging
import time

from coordinator.store import Store
from edgelearn.protocol import ProtocolError, decode_status

log = logging.getLogger(__name__)
RELAYS_KEY = "relays"  # state meta: JSON {relay id: its last status + "seen" (Unix s)}


def read_relays(store: Store) -> dict[str, dict]:
    return json.loads(store.get(RELAYS_KEY) or "{}")


def record_relay_statuses(store: Store, relays: dict[str, dict], messages: list[tuple[str, bytes]]) -> None:
    """Decode each (relay id, status payload), keep it in `relays` with the time it was seen, and save them all."""
    for relay_id, payload in messages:
        try:
            relays[relay_id] = {**decode_status(payload), "seen": round(time.time(), 3)}
        except ProtocolError as e:
            log.warning("status of relay %s ignored: %s", relay_id, e)
    if messages:
        store.set_meta({RELAYS_KEY: json.dumps(relays, sort_keys=True)})
