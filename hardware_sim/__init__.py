"""Stand-ins for the bin's hardware: mock pins, a camera of photos, item drops."""
