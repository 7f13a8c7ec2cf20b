"""Errors a user can fix. The CLI prints them as one line and exits non-zero, no traceback."""


class SmartbinError(Exception):
    """A problem with the user's input: config, model bundle, image, command or dataset."""


class BundleError(SmartbinError):
    """A model bundle is missing, damaged or malformed."""


class ImageError(SmartbinError):
    """An image cannot be read or decoded."""
