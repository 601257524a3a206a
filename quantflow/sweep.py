"""Expand a spec's ``sweep:`` grid into named variants.

A grid crosses methods with bits, group sizes, symmetry and per-method settings. Each axis
applies only to methods that have that field (FP8 has no group size, so it yields one variant
whatever the group-size axis holds); a combination the variant schema refuses (AWQ at 8 bits)
is left out with the schema's reason. Checks against the model's shapes happen at plan time.
"""

from __future__ import annotations

from pydantic import BaseModel, TypeAdapter, ValidationError

from quantflow.spec import RunSpec, SweepSpec, Variant, needs_calibration
from quantflow.sweep_grid import entries

VARIANT = TypeAdapter(Variant)


class Dropped(BaseModel):
    """A sweep combination left out, and why."""

    name: str
    reason: str


def grid_size(sweep: SweepSpec) -> int:
    return len(entries(sweep, Variant, needs_calibration))


def expand(spec: RunSpec) -> tuple[list[Variant], list[Dropped]]:
    """The sweep's variants the schema accepts, and the combinations it refuses with the reason."""
    if spec.sweep is None:
        return [], []
    kept, dropped = [], []
    for entry in entries(spec.sweep, Variant, needs_calibration):
        try:
            kept.append(VARIANT.validate_python(entry))
        except ValidationError as error:
            reason = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or 'variant'}: {e['msg']}" for e in error.errors())
            dropped.append(Dropped(name=entry["name"], reason=f"the {entry['method']} variant refuses it ({reason})"))
    return kept, dropped
