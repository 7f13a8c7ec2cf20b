"""`smartbin dashboard`: read the options, open the parts, serve until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from aiohttp import web

from bin_controller.config import MqttSection
from bin_controller.dashboard.auth import Auth
from bin_controller.dashboard.bridge import Bridge
from bin_controller.dashboard.fleet import Fleet
from bin_controller.dashboard.history import History
from bin_controller.dashboard.options import (
    PASSWORD_CREDENTIAL,
    VIEWER_CREDENTIAL,
    history_path,
    parse_listen,
    read_secret,
)
from bin_controller.dashboard.web import Dashboard, Hub, make_app
from bin_controller.errors import SmartbinError
from bin_controller.mqtt.connection import Connection, parse_host
from bin_controller.tools.monitor import _topic_level

log = logging.getLogger(__name__)

SHUTDOWN_S = 3.0


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    host, port = parse_host(args.mqtt, option="--mqtt")
    listen = parse_listen(args.listen)
    _topic_level("--prefix", args.prefix, wildcard=False)
    password = read_secret("--password-file", args.password_file, PASSWORD_CREDENTIAL,
                           required=True)
    assert password is not None
    viewer = read_secret("--viewer-password-file", args.viewer_password_file,
                         VIEWER_CREDENTIAL, required=False)
    if viewer is not None and viewer == password:
        raise SmartbinError("--viewer-password-file: the read-only password is the same as "
                            "the dashboard password; choose another one")
    for option, value in (("--ca-file", args.ca_file), ("--cert-file", args.cert_file),
                          ("--key-file", args.key_file),
                          ("--mqtt-password-file", args.mqtt_password_file)):
        if value and not Path(value).is_file():
            raise SmartbinError(f"{option} {value}: no such file")
    mqtt = MqttSection(enabled=True, host=host, port=port or (8883 if args.tls else 1883),
                       prefix=args.prefix, username=args.mqtt_username,
                       password_file=args.mqtt_password_file, tls=args.tls,
                       ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file)
    history = History(history_path(args.history))
    try:
        asyncio.run(serve(mqtt, listen, Auth(password=password, viewer_password=viewer),
                          history))
    finally:
        history.close()
    return 0


async def serve(mqtt: MqttSection, listen: tuple[str, int], auth: Auth,
                history: History) -> None:
    loop = asyncio.get_running_loop()
    fleet = Fleet(mqtt.prefix)
    hub = Hub(fleet, history)
    connection = Connection(mqtt, client_id=f"smartbin-dashboard-{socket.gethostname()}-"
                                            f"{os.getpid()}",
                            offline_note="the pages show the last state seen")
    bridge = Bridge(connection, mqtt.prefix, on_message=hub.on_message)

    def broker_state(connected: bool) -> None:  # on paho's thread
        with contextlib.suppress(RuntimeError):  # the loop already closed: stopping
            loop.call_soon_threadsafe(hub.broker_state, connected)

    connection.on_connect(lambda: broker_state(True))
    connection.on_disconnect(lambda: broker_state(False))
    app = make_app(Dashboard(fleet=fleet, history=history, auth=auth, bridge=bridge, hub=hub))
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_S)
    await runner.setup()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(runner, listen[0], listen[1])
        try:
            await site.start()
        except OSError as exc:
            raise SmartbinError(f"--listen {listen[0]}:{listen[1]}: cannot listen there: "
                                f"{exc.strerror or exc}") from None
        bridge.start(loop)
        address = runner.addresses[0]
        shown = f"[{address[0]}]" if ":" in address[0] else address[0]
        print(f"smartbin dashboard listening on http://{shown}:{address[1]}/", flush=True)
        await stop.wait()
    finally:
        bridge.stop()
        await runner.cleanup()
