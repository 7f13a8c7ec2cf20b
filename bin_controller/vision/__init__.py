"""The image model: bundles, their TFLite stages and the int8 classifier (all training needs)."""
