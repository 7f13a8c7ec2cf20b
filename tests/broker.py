"""A real mosquitto broker on a free loopback port, started and stopped by the tests."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from hardware_sim import broker as sim_broker


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto"
                                          if Path("/usr/sbin/mosquitto").exists() else None)
    if not found:
        if os.environ.get("CI"):
            pytest.fail("mosquitto is not installed (./dev test installs it)")
        pytest.skip("mosquitto is not installed: sudo apt-get install mosquitto")
    return found


class Broker(sim_broker.Broker):
    """The simulator's broker launcher (hardware_sim/broker.py), skipping the test on a
    machine without mosquitto (failing it in CI)."""

    def start(self) -> None:
        mosquitto_binary()
        super().start()


class Listener:
    """A dashboard: a persistent-session subscriber that records everything it gets."""

    def __init__(self, port: int, topic: str = "#", client_id: str = "test-dashboard") -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.retained: dict[str, bytes] = {}
        self.lock = threading.Condition()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=client_id, clean_session=False)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.topic = topic
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        with self.lock:
            self.messages.append((msg.topic, msg.payload, msg.retain))
            self.retained[msg.topic] = msg.payload
            self.lock.notify_all()

    def wait_for(self, predicate, timeout: float = 20.0) -> bool:
        with self.lock:
            return self.lock.wait_for(lambda: predicate(self), timeout=timeout)

    def payloads(self, topic: str) -> list[bytes]:
        with self.lock:
            return [p for t, p, _ in self.messages if t == topic]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def request(port: int, topic: str, payload: bytes | str, reply_topic: str,
            timeout: float = 10.0) -> bytes | None:
    """Publish one command and wait for its reply."""
    got: list[bytes] = []
    done = threading.Event()
    c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)

    def on_connect(client, userdata, flags, rc, props):
        client.subscribe(reply_topic, qos=1)

    def on_subscribe(client, userdata, mid, rcs, props):
        client.publish(topic, payload, qos=1)

    def on_message(client, userdata, msg):
        got.append(msg.payload)
        done.set()

    c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
    c.connect("127.0.0.1", port)
    c.loop_start()
    done.wait(timeout)
    c.loop_stop()
    c.disconnect()
    return got[0] if got else None
