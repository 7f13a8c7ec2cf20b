"""What the bin talks about: its states, a sorted item, a fault. No behaviour, no imports
of the loop, the store or MQTT, so each of them can depend on this alone."""

from __future__ import annotations

import enum
import time
from dataclasses import asdict, dataclass, field
from typing import Any


class State(enum.StrEnum):
    IDLE = "idle"
    SETTLING = "settling"
    CAPTURING = "capturing"
    CLASSIFYING = "classifying"
    SORTING = "sorting"
    CLEARING = "clearing"
    COOLDOWN = "cooldown"
    PAUSED = "paused"
    FAULT = "fault"


@dataclass
class SortEvent:
    """One sorted item, as stored and published."""

    time: float
    bin: str
    label: str | None
    label_en: str | None
    confidence: float | None  # of the label
    uncertain: bool
    failed: bool
    forced: bool
    cycle_ms: float  # sensor edge to item counted
    decision_ms: float  # sensor edge to servo command
    model: str
    model_version: str
    error: str | None = None
    bin_confidence: float | None = None  # of the bin: the sum over its labels
    seq: int = 0
    # The photo the decision was made on (None when the camera reports nothing): when its
    # exposure started (Unix time) and how it was exposed, so drifting light can be traced.
    frame_time: float | None = None
    exposure_us: int | None = None
    analogue_gain: float | None = None
    # The bin the model chose (the item may have gone elsewhere: fallback, forced).
    predicted_bin: str | None = None
    # A photo of the item was taken for the photo log (photos.keep), under this seq.
    photo: bool = False
    # The compartment the item was meant for, when that one was full (fill.when_full).
    redirected_from: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FrameInfo:
    """How one camera frame was taken: what a camera that knows it reports after capture."""

    time: float  # Unix time at which the frame's exposure started
    exposure_us: int | None = None
    analogue_gain: float | None = None


@dataclass
class Fault:
    kind: str  # jam, camera, classifier, double_drop
    detail: str
    time: float = field(default_factory=time.time)
