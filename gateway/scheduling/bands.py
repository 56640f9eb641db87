"""Priority bands, named by OpenAI's `service_tier`: `priority` before `default` before `flex`.

A band is strict: work of a lower band is dispatched only while nothing of a higher band waits. A key's
configuration names its default band and the highest it may ask for; asking above it is refused, never silently
lowered (the caller would otherwise believe it bought latency it did not get).
"""

from __future__ import annotations

import enum

from gateway.config import ServiceTier
from gateway.errors import PermissionDenied


class Band(enum.IntEnum):
    """Lower value, served first."""

    PRIORITY = 0
    DEFAULT = 1
    FLEX = 2

    @property
    def label(self) -> str:
        return self.name.lower()


BANDS = tuple(Band)
_BY_TIER: dict[str, Band] = {
    "priority": Band.PRIORITY,
    "scale": Band.PRIORITY,
    "default": Band.DEFAULT,
    "standard_only": Band.DEFAULT,  # Anthropic's name for it
    "flex": Band.FLEX,
}


def band_for(requested: str | None, default: ServiceTier, ceiling: ServiceTier) -> Band:
    """The band a request runs in: its `service_tier` (`auto` or none: the key's default), refused with 403 when
    above the key's ceiling. OpenAI's `scale` is its reserved-capacity tier, served here as `priority`; Anthropic's
    `standard_only` is `default`."""
    own = _BY_TIER[default]
    band = own if requested is None or requested == "auto" else _BY_TIER[requested]
    if band < _BY_TIER[ceiling]:
        raise PermissionDenied(
            f"This API key may not use service_tier '{requested}' (its highest is '{ceiling}').",
            param="service_tier",
            code="service_tier_not_allowed",
        )
    return band
