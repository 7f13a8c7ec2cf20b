"""The errors smartbin raises, one hierarchy.

`SmartbinError` and its subclasses are problems a person can fix (a config value, a model
bundle, an image, a command): the CLI prints them as one line and exits non-zero, with no
traceback. Where a builtin says the same thing (a bad value, a failed operation) the error
is also that builtin, so callers that only know Python's exceptions still catch it.
"""


class SmartbinError(Exception):
    """A problem with the user's input: config, model bundle, image, command or dataset."""


class ConfigError(SmartbinError, ValueError):
    """The configuration file or a value in it is wrong."""


class BundleError(SmartbinError):
    """A model bundle is missing, damaged or malformed."""


class ImageError(SmartbinError, ValueError):
    """An image cannot be read or decoded."""


class DatasetError(SmartbinError, ValueError):
    """A folder of labelled photos cannot be used for training or evaluation."""


class HardwareError(SmartbinError, RuntimeError):
    """A part of the bin (pins, camera, sensor, servo) is missing or cannot start."""


class CameraError(HardwareError):
    """A capture failed; the loop retries, then sends the item to the fallback bin."""


class StoreError(SmartbinError, OSError):
    """The count database cannot be opened or written."""


class CommandError(SmartbinError, ValueError):
    """A command (MQTT or CLI) is malformed, unknown, or cannot be carried out now."""


class BusyError(CommandError):
    """The bin cannot take the command at this moment (mid-item); try again."""
