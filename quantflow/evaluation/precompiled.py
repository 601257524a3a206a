"""The decode step compiled once per shape family, saved, and loaded by every later process of that family.

Every variant is evaluated in a process of its own. Inductor's FX-graph and autotuning caches
already spare a later process the kernel compile, but it still pays Dynamo tracing the whole step
and rebuilding the graph from the cache: on an H200 a third of the first compile at 7B. PyTorch's
ahead-of-time capture (``torch.compile(...).aot_compile``, experimental) saves the traced and compiled
step with its guards, so a later process with a model of the same structure (module types,
parameter shapes and dtypes, cache size, batch) only loads it.

Guards that name objects of one process (object ids, closures, dict versions) cannot be saved and
are left out. What keeps a loaded step honest is the rest: the file is keyed by the model's whole
structure, and its saved guards (module types, tensor shapes, dtypes, devices) are checked against the
live model, and its logits are compared with the eager step's, before it is used; on any mismatch or load error
the step is compiled afresh and saved again. On an H200 at 1.1B a later W4 variant's compile fell from 8-13 s to
3.6-5.2 s, against 21 s for the first (docs/benchmarks.md).
"""

from __future__ import annotations

import builtins
import hashlib
import logging
import re
from collections.abc import Callable
from pathlib import Path

import torch

from quantflow.infra.atomic import atomic_files

log = logging.getLogger(__name__)

# guards tied to one process's objects: what caching_precompile drops too
_UNSAVABLE = frozenset({"ID_MATCH", "CLOSURE_MATCH", "WEAKREF_ALIVE", "DICT_VERSION"})
# type guards derive an id match but are saved by the class's import path: they are what refuses a loaded step for
# a model whose layers are of other classes (bf16 Linear against Int4Linear), so they stay
_TYPE_GUARDS = ("TYPE_MATCH", "BUILTIN_MATCH")


def _savable(guards) -> list[bool]:
    return [
        g.guard_type in _TYPE_GUARDS
        or not (_UNSAVABLE & {g.guard_type, *(getattr(g, "derived_guard_types", None) or ())})
        for g in guards
    ]


def family_key(step: Callable, args: tuple, mode: str) -> str:
    """What the compiled step depends on: torch, the card, the compile mode, and the structure of every argument."""
    digest = hashlib.sha256()
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    digest.update(f"{torch.__version__}|{card}|{mode}|{step.__module__}.{step.__qualname__}".encode())
    for arg in args:
        digest.update(_structure(arg).encode())
    return digest.hexdigest()[:24]


def _structure(arg: object) -> str:
    if isinstance(arg, torch.Tensor):
        return f"T{tuple(arg.shape)}{arg.dtype}{arg.device.type}"
    if isinstance(arg, torch.nn.Module):
        modules = ";".join(f"{name}:{type(m).__qualname__}" for name, m in arg.named_modules())
        tensors = ";".join(_structure(t) for t in [*arg.parameters(), *arg.buffers()])
        config = arg.config.to_json_string() if hasattr(arg, "config") else ""
        return f"M{type(arg).__qualname__}|{modules}|{tensors}|{config}"
    layers = getattr(arg, "layers", None)  # a transformers Cache: its layers' tensors fix the graph's shapes
    tensors = [t for layer in layers or () for t in vars(layer).values() if isinstance(t, torch.Tensor)]
    return f"O{type(arg).__qualname__}|{';'.join(_structure(t) for t in tensors)}"


def _options(mode: str) -> dict:
    from torch._inductor import list_mode_options

    return {**(list_mode_options(mode) if mode != "default" else {}), "guard_filter_fn": _savable}


def load_or_compile(
    step: Callable, args: tuple, mode: str, folder: Path, reset: Callable[[], None]
) -> tuple[Callable, str]:
    """``step`` compiled for ``args`` (fullgraph), loaded from ``folder`` when a process of the same family saved it,
    else compiled and saved there. ``reset`` puts the state ``args`` point at (a KV cache) back, so a loaded step and
    the eager one are compared from the same state. Returns the callable and how it was obtained: "loaded",
    "compiled and saved", or "compiled, not saved: <error>" where this torch cannot capture ahead of time."""
    path = folder / f"{family_key(step, args, mode)}.step"
    loaded = _load(path, step, args, reset)
    if loaded is not None:
        return loaded, "loaded"
    try:
        with torch._dynamo.config.patch(enable_aot_compile=True):  # off by default before torch 2.12
            compiled = torch.compile(step, fullgraph=True, options=_options(mode)).aot_compile((args, {}))
    except Exception as error:  # an older torch, or a step this capture cannot save: compile as before
        log.warning("the decode step could not be captured ahead of time; compiling it in this process", exc_info=True)
        torch._dynamo.reset()
        return torch.compile(step, mode=mode, fullgraph=True), f"compiled, not saved: {type(error).__name__}"
    _save(compiled, path)
    return compiled, "compiled and saved"


def _load(path: Path, step: Callable, args: tuple, reset: Callable[[], None]) -> Callable | None:
    """The saved step, if it loads, its guards pass for ``args`` and its output matches the eager step's from the same
    state."""
    if not path.exists():
        return None
    try:
        with path.open("rb") as file:
            compiled = torch.compiler.load_compiled_function(file)
        if not _guards_pass(compiled, args):
            return None
        reset()
        ours = compiled(*args)
        reset()
        reference = step(*args)
    except Exception:  # a file from another torch, or a damaged one: compile afresh and overwrite it
        log.warning("the saved decode step %s could not be used; compiling afresh", path.name, exc_info=True)
        return None
    error = ((ours.float() - reference.float()).norm() / reference.float().norm().clamp_min(1e-12)).item()
    if error > MATCH_TOLERANCE:
        log.warning("the saved decode step %s is off the eager step by %.3f; compiling afresh", path.name, error)
        return None
    return compiled


# A step that read another model's tensors is off by order 1 (about 1.4 for two random models); a compiled step and the
# eager one differ by bf16 rounding (fusion reorders sums)
MATCH_TOLERANCE = 0.1


def _guards_pass(compiled, args: tuple) -> bool:
    """Check the saved guards. Dynamo's guards read builtins through a global (``__builtins_dict___N``) it installs
    in the module it compiled; torch 2.11's loader does not install it again in a fresh process, so the check fails
    on that alone (a KeyError). Installing the builtins under the names the failed check reports, as Dynamo's own
    compile would, is why this is hand-written; any other failure is a real mismatch."""
    for _ in range(8):
        if compiled.guard_check(*args):
            return True
        parts = compiled._artifacts.guard_manager.check_verbose(compiled.prepare_f_locals(*args)).verbose_code_parts
        missing = [m.group(1) for part in parts for m in [_MISSING_BUILTINS.search(part)] if m]
        if not missing:
            return False
        compiled.fn.__globals__.update(dict.fromkeys(missing, builtins.__dict__))
    return False


_MISSING_BUILTINS = re.compile(r"KeyError on G\['(__builtins_dict___\d+)'\]")


def _save(compiled, path: Path) -> None:
    """Written whole beside its place and renamed there, so a concurrent process never loads half a file."""
    data = type(compiled).serialize(compiled).serialized_data
    with atomic_files(path.parent) as scratch:
        (scratch / path.name).write_bytes(data)


def default_folder() -> Path:
    """Beside Inductor's own caches (``TORCHINDUCTOR_CACHE_DIR``, which quantflow points at its cache root)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / "quantflow-steps"
