"""The bin's hardware behind small interfaces: pins, presence sensor, flap, gate, camera."""
