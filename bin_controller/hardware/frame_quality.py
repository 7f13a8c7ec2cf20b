"""What a camera frame looks like, in numbers: brightness, sharpness, and whether the flap
in it is empty. Also the region of interest (`camera.crop`) cut out of a frame.

numpy only, so that the camera, `smartbin check` and the camera tools share one measure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

# ITU-R BT.601 luma weights: what "brightness" means for an RGB frame.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)
DARK_BELOW = 40.0  # mean luma (0..255) under which items are too dark to classify by colour
BRIGHT_ABOVE = 215.0  # mean luma over which light parts clip to white and lose their colour
# The emptiness test compares coarse cells, not pixels: sensor noise and a slightly moved
# flap average out, an item (which covers many cells) does not.
GRID = (32, 24)  # cells across, down
CELL_DIFF = 20.0  # luma levels by which a cell must stand out to count as "something there"
EMPTY_MAX_CHANGED = 0.02  # the flap looks empty while at most this fraction of cells stand out

Box = tuple[int, int, int, int]  # x, y, width, height in frame pixels


def crop_box(crop: Mapping[str, float]) -> Box | None:
    """`camera.crop` (validated by the config) as a box; None for the whole frame."""
    if not crop:
        return None
    return int(crop["x"]), int(crop["y"]), int(crop["width"]), int(crop["height"])


def apply_crop(frame: np.ndarray, box: Box | None) -> np.ndarray:
    """The region of interest of an [H, W, C] frame, contiguous (the classifier and PIL want
    their own buffer, not a view into the camera's)."""
    if box is None:
        return frame
    x, y, w, h = box
    if x + w > frame.shape[1] or y + h > frame.shape[0]:
        raise ValueError(f"crop {w}x{h}+{x}+{y} lies outside the {frame.shape[1]}x"
                         f"{frame.shape[0]} frame")
    return np.ascontiguousarray(frame[y:y + h, x:x + w])


def luma(frame: np.ndarray) -> np.ndarray:
    """[H, W] float32 luma of an RGB uint8 frame."""
    return np.asarray(frame[..., :3], np.float32) @ LUMA_WEIGHTS


def brightness(frame: np.ndarray) -> float:
    """Mean luma, 0 (black) to 255 (white)."""
    return float(luma(frame).mean())


def sharpness(frame: np.ndarray) -> float:
    """Variance of the Laplacian of the luma: high when edges are crisp, low when blurred.
    Only comparable between frames of the same scene (turn the lens to make it largest)."""
    y = luma(frame)
    if y.shape[0] < 3 or y.shape[1] < 3:
        return 0.0
    lap = (y[:-2, 1:-1] + y[2:, 1:-1] + y[1:-1, :-2] + y[1:-1, 2:] - 4 * y[1:-1, 1:-1])
    return float(lap.var())


def cells(frame: np.ndarray) -> np.ndarray:
    """Mean luma of each cell of a GRID laid over the frame ([down, across])."""
    y = luma(frame)
    across, down = GRID
    h, w = y.shape
    if h < down or w < across:
        raise ValueError(f"frame {w}x{h} is smaller than the {across}x{down} grid")
    rows = np.array_split(np.arange(h), down)
    cols = np.array_split(np.arange(w), across)
    return np.array([[y[r[0]:r[-1] + 1, c[0]:c[-1] + 1].mean() for c in cols] for r in rows],
                    np.float32)


def _without_plane(grid: np.ndarray) -> np.ndarray:
    """The grid less its best-fitting plane: light falling off across the flap is not an
    item."""
    down, across = grid.shape
    yy, xx = np.mgrid[0:down, 0:across]
    a = np.column_stack([np.ones(grid.size), xx.ravel(), yy.ravel()])
    coef, *_ = np.linalg.lstsq(a, grid.ravel(), rcond=None)
    residual: np.ndarray = grid - (a @ coef).reshape(grid.shape)
    return residual


@dataclass(frozen=True)
class Emptiness:
    empty: bool
    changed: float  # fraction of cells that stand out
    method: str  # "reference" or "uniformity"

    def describe(self) -> str:
        what = ("differs from the reference" if self.method == "reference"
                else "stands out from a plain flap")
        verdict = "flap looks empty" if self.empty else "something is in view"
        return f"{verdict} ({self.changed:.0%} of the view {what})"


def emptiness(frame: np.ndarray, reference: np.ndarray | None = None) -> Emptiness:
    """Does the frame show an empty flap? Against a reference photo of the empty flap when
    there is one (a flap with markings or texture needs it), else by uniformity: an empty
    flap is plain, evenly or smoothly lit."""
    grid = cells(frame)
    if reference is not None:
        ref = cells(reference)
        # Overall level may differ (auto exposure): compare the pattern, not the level.
        diff = np.abs((grid - grid.mean()) - (ref - ref.mean()))
        method = "reference"
    else:
        diff = np.abs(_without_plane(grid))
        method = "uniformity"
    changed = float((diff > CELL_DIFF).mean())
    return Emptiness(changed <= EMPTY_MAX_CHANGED, changed, method)
