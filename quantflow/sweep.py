"""Expand a spec's ``sweep:`` grid into named variants.

A grid crosses methods with bits, group sizes, symmetry and per-method settings. Each axis
applies only to methods that have that field (FP8 has no group size, so it yields one variant
whatever the group-size axis holds); a combination the variant schema refuses (AWQ at 8 bits)
is left out with the schema's reason. Checks against the model's shapes happen at plan time.
"""

from __future__ import annotations

import itertools
import typing
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from quantflow.spec import RunSpec, SweepSpec, Variant

VARIANT = TypeAdapter(Variant)


class Dropped(BaseModel):
    """A sweep combination left out, and why."""

    name: str
    reason: str


def variant_name(entry: dict[str, Any]) -> str:
    """A name that says what the combination is: ``gptq-w4-g64-asym``, ``awq-w4-g128-sym-n_grid10``, ``fp8``."""
    parts = [entry["method"]]
    if "bits" in entry:
        parts.append(f"w{entry['bits']}")
    if "group_size" in entry:
        parts.append("ch" if entry["group_size"] is None else f"g{entry['group_size']}")
    if "symmetric" in entry:
        parts.append("sym" if entry["symmetric"] else "asym")
    fixed = {"method", *AXES.values()}
    parts += [f"{key}{str(value).lower()}" for key, value in entry.items() if key not in fixed]
    return "-".join(parts)


AXES = {"bits": "bits", "group_sizes": "group_size", "symmetric": "symmetric"}


def entries(sweep: SweepSpec) -> list[dict[str, Any]]:
    """Every combination as a variant entry, each axis applied only where the method has the field."""
    found, seen = [], set()
    for method in sweep.methods:
        fields = VARIANT_FIELDS[method]
        axes = {field: getattr(sweep, name) for name, field in AXES.items() if field in fields}
        settings = {k: v if isinstance(v, list) else [v] for k, v in sweep.settings.get(method, {}).items()}
        axes.update(settings)
        for values in itertools.product(*axes.values()):
            entry = {"method": method, **dict(zip(axes, values))}
            name = variant_name(entry)
            if name not in seen:
                seen.add(name)
                found.append({**entry, "name": name})
    return found


def grid_size(sweep: SweepSpec) -> int:
    return len(entries(sweep))


def expand(spec: RunSpec) -> tuple[list[Variant], list[Dropped]]:
    """The sweep's variants the schema accepts, and the combinations it refuses with the reason."""
    if spec.sweep is None:
        return [], []
    kept, dropped = [], []
    for entry in entries(spec.sweep):
        try:
            kept.append(VARIANT.validate_python(entry))
        except ValidationError as error:
            reason = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or 'variant'}: {e['msg']}" for e in error.errors())
            dropped.append(Dropped(name=entry["name"], reason=f"the {entry['method']} variant refuses it ({reason})"))
    return kept, dropped


def variant_classes() -> dict[str, type[BaseModel]]:
    """Each method name -> its variant model, read from the spec's discriminated union."""
    union = typing.get_args(Variant)[0]
    return {
        method: model
        for model in typing.get_args(union)
        for method in typing.get_args(model.model_fields["method"].annotation)
    }


VARIANT_FIELDS = {method: set(model.model_fields) for method, model in variant_classes().items()}
