"""Home Assistant MQTT discovery: which entities the bin announces, as plain data.

Pure functions of the configuration, so they are tested without a broker; the retained
part publishes them (retained) on every connect and when Home Assistant restarts.
"""

from __future__ import annotations

from bin_controller import __version__
from bin_controller.bins import BINS
from bin_controller.config import MqttSection
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
    JsonObject,
    command_topic,
    counts_topic,
    to_json,
)


def node_id(bin_id: str) -> str:
    # Home Assistant object ids allow [a-zA-Z0-9_]; bin ids are often host names with '-'.
    return f"smartbin_{bin_id}".replace("-", "_")


def status_topic(cfg: MqttSection) -> str:
    """Where Home Assistant says `online` after it restarts and has forgotten every entity."""
    return f"{cfg.discovery_prefix}/status"


def device(bin_id: str) -> JsonObject:
    return {"identifiers": [node_id(bin_id)], "name": f"Smart bin {bin_id}",
            "manufacturer": "smartbin", "model": "four-compartment sorting bin",
            "sw_version": __version__}


# The total contamination in percent; "None" (no review yet) is Home Assistant's unknown.
CONTAMINATION_TEMPLATE = (
    "{% set c = value_json.contamination | default(none) %}"
    "{{ (c.total.rate * 100) | round(1) if c and c.total.rate is not none else none }}")


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
        "value_template": "{{ value_json.bin }}", "icon": "mdi:tray-arrow-down"}
    out["state"] = {
        "name": "State", "state_topic": f"{base}/{STATE}",
        "value_template": "{{ value_json.state }}",
        "json_attributes_topic": f"{base}/{STATE}", "icon": "mdi:state-machine"}
    if photos:
        out["contamination"] = {
            "name": "Contamination", "state_topic": f"{base}/{COUNTS}",
            "value_template": CONTAMINATION_TEMPLATE, "state_class": "measurement",
            "unit_of_measurement": "%", "json_attributes_topic": f"{base}/{COUNTS}",
            "json_attributes_template": "{{ (value_json.contamination | default({})) "
                                        "| tojson }}",
            "icon": "mdi:delete-alert"}
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
    contamination; with `fill` (a bin tracking its fill levels) per compartment its level,
    a problem while full and an "Emptied" button."""
    node = node_id(bin_id)
    dev = device(bin_id)
    availability: JsonObject = {"availability_topic": f"{base}/{AVAILABILITY}",
                                "payload_available": ONLINE,
                                "payload_not_available": OFFLINE}
    out: dict[str, JsonObject] = {}
    entities = sensors(base, photos=photos)
    if fill:
        entities.update(fill_sensors(base))
    for key, conf in entities.items():
        topic = f"{cfg.discovery_prefix}/sensor/{node}/{key}/config"
        out[topic] = {**conf, "unique_id": f"{node}_{key}", "object_id": f"{node}_{key}",
                      "device": dev, **availability}
    online = f"{cfg.discovery_prefix}/binary_sensor/{node}/online/config"
    out[online] = {"name": "Online", "state_topic": f"{base}/{AVAILABILITY}",
                   "payload_on": ONLINE, "payload_off": OFFLINE,
                   "device_class": "connectivity", "unique_id": f"{node}_online",
                   "object_id": f"{node}_online", "device": dev}
    if photos:
        image = f"{cfg.discovery_prefix}/image/{node}/last_image/config"
        out[image] = {"name": "Last item picture", "image_topic": f"{base}/{IMAGE}",
                      "content_type": IMAGE_CONTENT_TYPE, "unique_id": f"{node}_last_image",
                      "object_id": f"{node}_last_image", "device": dev, **availability}
    if fill:
        for (platform, key), conf in fill_entities(base).items():
            out[f"{cfg.discovery_prefix}/{platform}/{node}/{key}/config"] = {
                **conf, "unique_id": f"{node}_{key}", "object_id": f"{node}_{key}",
                "device": dev, **availability}
    return out
