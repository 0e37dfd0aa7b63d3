"""Frame windows: how a year (or any date range) is split into ``n_frames`` composites.

The rule is the peer's, which the contract follows: window ``i`` of ``n`` over
``[start, end)`` starts ``floor(total_days * i / n)`` days after ``start``;
the last window ends at ``end``; every window is end-exclusive. For a calendar
year the range is ``[Y-01-01, (Y+1)-01-01)``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from agrifm_pipeline.errors import InputContractError
from agrifm_pipeline.specs import S2_L2A_FIRST_YEAR, TemporalSpec


@dataclass(frozen=True)
class FrameWindow:
    """One frame's end-exclusive day window ``[start, end)``."""

    index: int
    start: dt.date
    end: dt.date

    @property
    def days(self) -> int:
        return (self.end - self.start).days

    def contains(self, day: dt.date) -> bool:
        return self.start <= day < self.end

    def as_record(self) -> dict[str, object]:
        return {"index": self.index, "start": self.start.isoformat(), "end": self.end.isoformat()}


def range_windows(start: dt.date | str, end: dt.date | str, n_frames: int) -> list[FrameWindow]:
    """Split ``[start, end)`` into ``n_frames`` windows by the peer's floor rule."""
    span = TemporalSpec.range(start, end)
    if not isinstance(n_frames, int) or isinstance(n_frames, bool) or n_frames < 1:
        raise InputContractError(f"n_frames={n_frames!r}; use a whole number >= 1")
    total = span.days
    if n_frames > total:
        raise InputContractError(
            f"n_frames={n_frames} is more than the {total} days in [{span.start}, {span.end}); "
            "use fewer frames or a longer range"
        )
    bounds = [span.start + dt.timedelta(days=(total * i) // n_frames) for i in range(n_frames)]
    bounds.append(span.end)
    return [FrameWindow(i, bounds[i], bounds[i + 1]) for i in range(n_frames)]


def frame_windows(
    year: int, n_frames: int, *, first_year: int = S2_L2A_FIRST_YEAR
) -> list[FrameWindow]:
    """The ``n_frames`` windows of calendar ``year`` (S2 L2A: 2017 onwards by default)."""
    if not isinstance(year, int) or isinstance(year, bool):
        raise InputContractError(f"year={year!r} is not a calendar year")
    if year < first_year:
        raise InputContractError(
            f"year={year} is before {first_year}, the first year of Sentinel-2 L2A; use {first_year} or later"
        )
    return range_windows(dt.date(year, 1, 1), dt.date(year + 1, 1, 1), n_frames)
