"""The seams of the sorting cycle: what the loop needs from each part, and nothing more.

The loop is typed against these protocols only. The real parts (gpiozero devices, picamera2,
the TFLite classifier, the SQLite store) and the simulator's parts implement them, and the
loop's unit tests use small fakes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from bin_controller.domain import FrameInfo, SortEvent
from bin_controller.vision.bundle import Bundle
from bin_controller.vision.classifier import Prediction


class PresenceSensor(Protocol):
    """Tells whether an item lies on the flap, and when that changes."""

    @property
    def present(self) -> bool: ...

    def on_change(self, callback: Callable[[bool, float], None]) -> None:
        """Call `callback(present, monotonic_time)` on every edge, from any thread."""
        ...

    def wait_for_clear(self, timeout: float | None) -> bool:
        """Block until nothing is present (True) or the timeout passes (False)."""
        ...

    def close(self) -> None: ...


class Camera(Protocol):
    def capture(self) -> np.ndarray:
        """An RGB uint8 [H, W, 3] frame of the item on the flap; CameraError on failure."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class DescribesFrames(Protocol):
    """A camera that tells when and how its last frame was exposed (picamera2 does, from
    the frame's metadata); the loop journals it with the item."""

    @property
    def last_frame(self) -> FrameInfo | None:
        """The frame the last successful capture returned; None after a failed one."""
        ...


@runtime_checkable
class Recalibrates(Protocol):
    """A camera whose exposure is fixed once settled, and can be settled again."""

    def recalibrate(self) -> dict[str, Any]:
        """Settle exposure and white balance on the empty flap, fix them, report them."""
        ...


class ImageClassifier(Protocol):
    @property
    def bundle(self) -> Bundle: ...

    @property
    def backend(self) -> str: ...

    def classify_array(self, frame: np.ndarray) -> Prediction: ...


class Flap(Protocol):
    """The servo flap that holds the item while it is photographed, then tips it."""

    def angle_for(self, bin_name: str) -> float: ...

    def sort(self, bin_name: str, *, on_commanded: Callable[[], None] | None = None) -> None:
        """Tip to the bin, hold while the item slides off, return to rest."""
        ...

    def move_to(self, angle: float, *, hold: bool = False) -> None: ...

    def rest(self) -> None: ...

    def close(self) -> None: ...


class Gate(Protocol):
    """An optional second servo that closes the chute while an item is sorted."""

    def close_gate(self) -> None: ...

    def open_gate(self) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class Background(Protocol):
    """A part with work of its own that starts once the whole bin is assembled (the
    simulator's world re-driving its sensor lines, a person dropping items)."""

    def start(self) -> None: ...


class PhotoSink(Protocol):
    """Keeps each item's photo (the photo log); never delays the loop."""

    def wants(self, event: SortEvent) -> bool:
        """Whether this decided item's photo will be kept (its event says so)."""
        ...

    def keep(self, event: SortEvent, frame: np.ndarray | None) -> None:
        """Take the committed item (its seq given) and the frame it was classified on."""
        ...


class FillGauge(Protocol):
    """How full the compartments are (the fill tracker)."""

    def is_full(self, bin_name: str) -> bool: ...

    def added(self, event: SortEvent) -> None:
        """An item was counted in `event.bin`: it takes room there now."""
        ...


@dataclass(frozen=True)
class Pending:
    """An item whose bin is decided and noted before the flap moves: the token the loop
    hands back to commit it. `id` is the recorder's own key (None when it keeps none)."""

    event: SortEvent
    id: int | None = None


class Recorder(Protocol):
    """Counts and journals items; numbers each one (`seq`) when it is committed."""

    def begin(self, event: SortEvent) -> Pending:
        """Note a decided item before the flap moves (so a crash cannot lose or double it)."""
        ...

    def commit(self, pending: Pending, *, also: Sequence[SortEvent] = ()) -> SortEvent:
        """Count the item begun with `begin`, once it has been sorted, with the items that
        slid through beside it (`also`, numbered after it), all or none."""
        ...

    def cleared(self) -> None:
        """The chute is clear of every item counted so far (a restart that finds an item on
        the flap then knows it is a new one, not the last one jammed)."""
        ...

    def record(self, event: SortEvent) -> SortEvent:
        """Count an item that was never decided (one that slid through unsorted)."""
        ...
