"""Smart bin controller: sense an item, photograph it, classify it, sort it, report it."""

__version__ = "0.1.0"
