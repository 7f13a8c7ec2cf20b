"""The model bundles shipped with smartbin, installed as the package `smartbin_models`.

Only a marker: it makes this folder importable so that bin_controller.vision.bundle finds
the bundles with importlib.resources, in a checkout and in an installed wheel alike.
"""
