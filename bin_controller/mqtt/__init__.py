"""MQTT: telemetry out, commands in."""
