"""Home Assistant MQTT discovery: which entities the bin announces, as plain data.

Pure functions of the configuration, so they are tested without a broker; the retained
part publishes them (retained) on every connect and when Home Assistant restarts.
"""

from __future__ import annotations

import hashlib
import re

from bin_controller import __version__
from bin_controller.bins import BINS
from bin_controller.config import MqttSection
from bin_controller.domain import State
from bin_controller.payloads import (
    AVAILABILITY,
    COUNTS,
    FILL,
    IMAGE,
    IMAGE_CONTENT_TYPE,
    LAST,
    OFFLINE,
    ONLINE,
    STATE,
    STATS,
    TEACH_PHASES,
    JsonObject,
    command_topic,
    counts_topic,
    to_json,
)

# Who made the entities, in every config (Home Assistant's `origin`, which it logs and shows).
ORIGIN_NAME = "smartbin"
# The project's public home for `origin`'s url; the project has none yet: left out while empty.
PROJECT_URL = ""

# What Home Assistant accepts as a discovery topic's node id and object id.
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def node_id(bin_id: str) -> str:
    """The bin's id in Home Assistant: its discovery topics' node id, and the start of its
    device identifier, unique ids and object ids.

    Home Assistant accepts only [a-zA-Z0-9_-] in a discovery topic's node id and object id
    (anything else is an "illegal discovery topic" and nothing is created), and entity ids
    are [a-z0-9_]. So: `smartbin_` + the bin id with '-' as '_' (what every bin has had
    from the start, kept so that existing unique ids do not change), and every other
    character outside [a-zA-Z0-9_] also '_' followed, when there was any such character,
    by `_` and 8 hex digits of the SHA-256 of the bin id (UTF-8): `lab.bin` ->
    `smartbin_lab_bin_<hash>`, `küche` -> `smartbin_k_che_<hash>`, which never meets
    `k_che` -> `smartbin_k_che`. The MQTT topics keep the real bin id.

    Not told apart (as before): ids that differ only in '-' against '_' (`bin-1`, `bin_1`).
    """
    safe = _UNSAFE.sub("_", bin_id)
    node = f"smartbin_{safe}".replace("-", "_")
    if safe != bin_id:
        node += "_" + hashlib.sha256(bin_id.encode()).hexdigest()[:8]
    return node


def status_topic(cfg: MqttSection) -> str:
    """Where Home Assistant says `online` after it restarts and has forgotten every entity."""
    return f"{cfg.discovery_prefix}/status"


def device(bin_id: str, configuration_url: str = "") -> JsonObject:
    """The one device all entities belong to; with a dashboard, Home Assistant links to it
    (`configuration_url`, from mqtt.dashboard_url)."""
    out: JsonObject = {"identifiers": [node_id(bin_id)], "name": f"Smart bin {bin_id}",
                       "manufacturer": "smartbin", "model": "four-compartment sorting bin",
                       "sw_version": __version__}
    if configuration_url:
        out["configuration_url"] = configuration_url
    return out


def origin() -> JsonObject:
    """Home Assistant's `origin` (abbreviated keys `sw`, `url`, as its docs list them)."""
    out: JsonObject = {"name": ORIGIN_NAME, "sw": __version__}
    if PROJECT_URL:
        out["url"] = PROJECT_URL
    return out


# The total contamination in percent; "None" (no review yet) is Home Assistant's unknown.
CONTAMINATION_TEMPLATE = (
    "{% set c = value_json.contamination | default(none) %}"
    "{{ (c.total.rate * 100) | round(1) if c and c.total.rate is not none else none }}")


# The background teach (`state`'s `teach`, null before the first one): its phase, and the
# progress of the running phase in percent. A phase that is not a teach's, or no teach yet,
# is Home Assistant's unknown ("None"), which an enum sensor allows.
TEACH_TEMPLATE = (
    "{% set t = value_json.teach | default(none) %}"
    "{{ t.phase if t and t.phase in " + repr(list(TEACH_PHASES)) + " else none }}")
# What the owner asks of the last teach, small (the evaluation stays in `state`).
TEACH_ATTRIBUTES_TEMPLATE = (
    "{% set t = value_json.teach | default(none) or {} %}"
    "{% set r = t.result | default(none) or {} %}"
    "{{ {'done': t.done | default(none), 'total': t.total | default(none), "
    "'finished_at': t.finished_at | default(none), 'error': t.error | default(none), "
    "'model': r.model | default(none), 'version': r.version | default(none)} | tojson }}")
TEACH_PROGRESS_TEMPLATE = (
    "{% set t = value_json.teach | default(none) %}"
    "{{ ((100 * t.done / t.total) | round(0) if t.total else 0) "
    "if t and t.finished is none else none }}")


def teach_sensors(base: str) -> dict[str, JsonObject]:
    """The background teach's phase (enum, the last outcome's version or error as
    attributes) and the running phase's progress in percent (unknown when none runs)."""
    return {
        "teach": {
            "name": "Teach", "state_topic": f"{base}/{STATE}",
            "value_template": TEACH_TEMPLATE, "json_attributes_topic": f"{base}/{STATE}",
            "json_attributes_template": TEACH_ATTRIBUTES_TEMPLATE, "icon": "mdi:school",
            "device_class": "enum", "options": list(TEACH_PHASES)},
        "teach_progress": {
            "name": "Teach progress", "state_topic": f"{base}/{STATE}",
            "value_template": TEACH_PROGRESS_TEMPLATE, "unit_of_measurement": "%",
            "icon": "mdi:progress-clock"},
    }


def sensors(base: str, *, photos: bool = False) -> dict[str, JsonObject]:
    """Sensor key -> its entity config without the shared fields."""
    out: dict[str, JsonObject] = {}
    for b in BINS:
        out[f"count_{b}"] = {
            "name": f"{b.capitalize()} items", "state_topic": f"{base}/{counts_topic(b)}",
            "state_class": "total_increasing", "unit_of_measurement": "items",
            "icon": "mdi:delete-variant"}
    out["count_total"] = {
        "name": "Items sorted", "state_topic": f"{base}/{COUNTS}",
        "value_template": "{{ value_json.total }}", "state_class": "total_increasing",
        "unit_of_measurement": "items", "icon": "mdi:delete"}
    out["last_item"] = {
        "name": "Last item", "state_topic": f"{base}/{LAST}",
        "value_template": "{{ value_json.label_en or value_json.label or 'unknown' }}",
        "json_attributes_topic": f"{base}/{LAST}", "icon": "mdi:recycle"}
    out["last_bin"] = {
        "name": "Last bin", "state_topic": f"{base}/{LAST}",
        "value_template": "{{ value_json.bin }}", "icon": "mdi:tray-arrow-down",
        "device_class": "enum", "options": list(BINS)}
    out["state"] = {
        "name": "State", "state_topic": f"{base}/{STATE}",
        "value_template": "{{ value_json.state }}",
        "json_attributes_topic": f"{base}/{STATE}", "icon": "mdi:state-machine",
        "device_class": "enum", "options": [s.value for s in State]}
    if photos:
        out["contamination"] = {
            "name": "Contamination", "state_topic": f"{base}/{COUNTS}",
            "value_template": CONTAMINATION_TEMPLATE, "state_class": "measurement",
            "unit_of_measurement": "%", "json_attributes_topic": f"{base}/{COUNTS}",
            "json_attributes_template": "{{ (value_json.contamination | default({})) "
                                        "| tojson }}",
            "icon": "mdi:delete-alert"}
        # cmd/teach is there with the photo log (it teaches from the reviewed photos).
        out.update(teach_sensors(base))
    return out


# The `stats` figures Home Assistant shows as diagnostic sensors: key -> (name, unit, device
# class or None, icon). A figure missing from a message (no CPU temperature off a Pi) or null
# (no cycle yet) is Home Assistant's unknown ("None").
STATS_SENSORS: dict[str, tuple[str, str, str | None, str]] = {
    "uptime_s": ("Uptime", "s", "duration", "mdi:timer-outline"),
    "cycle_ms_p95": ("Cycle time p95", "ms", "duration", "mdi:timer-sand"),
    "items_per_hour": ("Items per hour", "items/h", None, "mdi:speedometer"),
    "outbox": ("Outbox", "messages", None, "mdi:tray-full"),
    "cpu_temperature_c": ("CPU temperature", "°C", "temperature", "mdi:thermometer"),
}


def stats_sensors(base: str) -> dict[str, JsonObject]:
    """Diagnostic sensors read from the `stats` message (every mqtt.stats_interval_s and on
    every connect)."""
    out: dict[str, JsonObject] = {}
    for key, (name, unit, device_class, icon) in STATS_SENSORS.items():
        conf: JsonObject = {
            "name": name, "state_topic": f"{base}/{STATS}",
            "value_template": f"{{{{ value_json.{key} | default(none) }}}}",
            "state_class": "measurement", "unit_of_measurement": unit,
            "entity_category": "diagnostic", "icon": icon}
        if device_class is not None:
            conf["device_class"] = device_class
        out[f"stats_{key}"] = conf
    return out


def controls(base: str) -> dict[tuple[str, str], JsonObject]:
    """(platform, key) -> entity config: the buttons and the select that send commands.

    A button sends its `payload_press` (a command's JSON; Home Assistant's default, PRESS,
    would be refused as not JSON) to the command's topic; the select turns the chosen bin
    into `{"bin": ...}` with its command_template. The select has no state topic: Home
    Assistant shows the last choice it sent."""
    out: dict[tuple[str, str], JsonObject] = {
        ("button", "pause"): {
            "name": "Pause", "command_topic": f"{base}/{command_topic('pause')}",
            "payload_press": "{}", "icon": "mdi:pause"},
        ("button", "resume"): {
            "name": "Resume", "command_topic": f"{base}/{command_topic('resume')}",
            "payload_press": "{}", "icon": "mdi:play"},
    }
    for b in BINS:
        out[("button", f"sort_next_{b}")] = {
            "name": f"Sort next to {b}", "command_topic": f"{base}/{command_topic('sort_next')}",
            "payload_press": to_json({"bin": b}), "icon": "mdi:debug-step-over"}
    out[("select", "sort_next")] = {
        "name": "Sort next", "command_topic": f"{base}/{command_topic('sort_next')}",
        "command_template": '{"bin": "{{ value }}"}', "options": list(BINS),
        "icon": "mdi:debug-step-over"}
    return out


def fill_sensors(base: str) -> dict[str, JsonObject]:
    """Per compartment its level in percent, from the retained `fill` (its other fields,
    such as the state and the time to full, as attributes)."""
    return {f"fill_{b}": {
        "name": f"{b.capitalize()} fill", "state_topic": f"{base}/{FILL}",
        "value_template": f"{{{{ value_json.{b}.pct }}}}", "state_class": "measurement",
        "unit_of_measurement": "%", "json_attributes_topic": f"{base}/{FILL}",
        "json_attributes_template": f"{{{{ value_json.{b} | tojson }}}}",
        "icon": "mdi:delete-empty"} for b in BINS}


def fill_entities(base: str) -> dict[tuple[str, str], JsonObject]:
    """(platform, key) -> entity config: per compartment a problem that is on while it is
    full, and the button that says it was emptied (cmd/emptied)."""
    out: dict[tuple[str, str], JsonObject] = {}
    for b in BINS:
        out[("binary_sensor", f"full_{b}")] = {
            "name": f"{b.capitalize()} full", "state_topic": f"{base}/{FILL}",
            "value_template": f"{{{{ 'ON' if value_json.{b}.state == 'full' else 'OFF' }}}}",
            "device_class": "problem"}
        out[("button", f"emptied_{b}")] = {
            "name": f"Emptied {b}", "command_topic": f"{base}/{command_topic('emptied')}",
            "payload_press": to_json({"bin": b}), "icon": "mdi:delete-restore"}
    return out


def discovery_payloads(cfg: MqttSection, bin_id: str, base: str, *,
                       photos: bool = False, fill: bool = False) -> dict[str, JsonObject]:
    """Config topic -> config payload, for every entity of the bin, under one device; with
    `photos` (a bin keeping a photo log) also the last item's picture and the
    contamination and the background teach's phase and progress; with `fill` (a bin
    tracking its fill levels) per compartment its level,
    a problem while full and an "Emptied" button. Always: the state and the last bin as
    enum sensors, the `stats` figures as diagnostic sensors, Pause, Resume and per
    compartment "Sort next to" buttons, and a "Sort next" select. Every config carries
    `origin`; the device a `configuration_url` when mqtt.dashboard_url is set."""
    node = node_id(bin_id)
    dev = device(bin_id, cfg.dashboard_url)
    made_by = origin()
    availability: JsonObject = {"availability_topic": f"{base}/{AVAILABILITY}",
                                "payload_available": ONLINE,
                                "payload_not_available": OFFLINE}
    out: dict[str, JsonObject] = {}
    entities = sensors(base, photos=photos)
    if fill:
        entities.update(fill_sensors(base))
    entities.update(stats_sensors(base))
    for key, conf in entities.items():
        topic = f"{cfg.discovery_prefix}/sensor/{node}/{key}/config"
        out[topic] = {**conf, "unique_id": f"{node}_{key}", "object_id": f"{node}_{key}",
                      "device": dev, **availability, "origin": made_by}
    online = f"{cfg.discovery_prefix}/binary_sensor/{node}/online/config"
    out[online] = {"name": "Online", "state_topic": f"{base}/{AVAILABILITY}",
                   "payload_on": ONLINE, "payload_off": OFFLINE,
                   "device_class": "connectivity", "unique_id": f"{node}_online",
                   "object_id": f"{node}_online", "device": dev, "origin": made_by}
    if photos:
        image = f"{cfg.discovery_prefix}/image/{node}/last_image/config"
        out[image] = {"name": "Last item picture", "image_topic": f"{base}/{IMAGE}",
                      "content_type": IMAGE_CONTENT_TYPE, "unique_id": f"{node}_last_image",
                      "object_id": f"{node}_last_image", "device": dev, **availability,
                      "origin": made_by}
    others = fill_entities(base) if fill else {}
    others.update(controls(base))
    for (platform, key), conf in others.items():
        out[f"{cfg.discovery_prefix}/{platform}/{node}/{key}/config"] = {
            **conf, "unique_id": f"{node}_{key}", "object_id": f"{node}_{key}",
            "device": dev, **availability, "origin": made_by}
    return out
