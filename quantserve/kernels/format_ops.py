"""One registry entry per packed format class: what each kernel family does with it.

An entry (`FormatOps`) holds, for one class of kernels/formats.py,
- `reference`: the torch reference dequantizer (kernels/reference.py), packed -> float32 (N, K) before rounding;
- `cpu`: the builder of its C descriptor (kernels/cpu.py), packed -> (QsWeight, tensors to keep alive);
- `triton`: its Triton tile spec (kernels/triton_args.py), packed -> TileArgs;
- `float8_codes`: whether its codes or scales are float8 (the Triton kernels decode them by integer arithmetic below
  compute capability 8.9, which has no float8 conversion: kernels/triton_args.py).

Every kernel family dispatches by `type(packed)` through this one table (`ops_for`, `implementation`), never by
if/elif chains. Each family registers its own slot where its code lives (`register_format(cls, reference=fn)`), so
importing the reference never imports Triton or the C library; `implementation` names what is missing when a slot
is empty.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .formats import NVFP4, FORMAT_CLASSES, Float8, FormatError

SLOTS = ("reference", "cpu", "triton")


@dataclass
class FormatOps:
    """What quantserve's kernels do with one packed format class (slots are filled as their modules load)."""

    cls: type
    reference: Callable[[Any], Any] | None = None
    cpu: Callable[[Any], Any] | None = None
    triton: Callable[[Any], Any] | None = None
    float8_codes: bool = False


_OPS: dict[type, FormatOps] = {cls: FormatOps(cls, float8_codes=cls in (Float8, NVFP4)) for cls in FORMAT_CLASSES}


def register_format(cls: type, **slots: Callable[[Any], Any]) -> FormatOps:
    """Fill slots (`reference=`, `cpu=`, `triton=`) of `cls`'s entry; a slot is set once."""
    entry = _OPS.get(cls)
    if entry is None:
        raise FormatError(f"register_format: {getattr(cls, '__name__', cls)!r} is not a packed format class of "
                          f"kernels/formats.py; accepted: {', '.join(c.__name__ for c in _OPS)}")
    for slot, fn in slots.items():
        if slot not in SLOTS:
            raise ValueError(f"register_format: slot {slot!r}; accepted: {', '.join(map(repr, SLOTS))}")
        current = getattr(entry, slot)
        if current is not None and current is not fn:
            raise ValueError(f"register_format: {cls.__name__}.{slot} is already {current.__qualname__}")
        setattr(entry, slot, fn)
    return entry


def registers(cls: type, slot: str) -> Callable[[Callable], Callable]:
    """Decorator form of register_format: `@registers(BnB4bit, "cpu")` above the builder."""
    def register(fn: Callable) -> Callable:
        register_format(cls, **{slot: fn})
        return fn

    return register


def ops_for(packed: Any, who: str) -> FormatOps:
    """The entry of `packed`'s class; a FormatError naming `who` and the accepted classes when it is none."""
    entry = _OPS.get(type(packed))
    if entry is None:
        raise FormatError(f"{who}: {type(packed).__name__} is not a packed format; accepted: "
                          f"{', '.join(c.__name__ for c in _OPS)}")
    return entry


def implementation(packed: Any, slot: str, who: str) -> Callable[[Any], Any]:
    """`packed`'s implementation in `slot` ("reference", "cpu" or "triton"), dispatched by its type."""
    fn = getattr(ops_for(packed, who), slot)
    if fn is None:
        have = [c.__name__ for c, e in _OPS.items() if getattr(e, slot) is not None]
        raise FormatError(f"{who}: {type(packed).__name__} has no {slot} implementation; accepted: {', '.join(have)}")
    return fn


def entries() -> tuple[FormatOps, ...]:
    """Every format's entry, in kernels/formats.py's order."""
    return tuple(_OPS.values())


__all__ = ["FormatOps", "SLOTS", "entries", "implementation", "ops_for", "register_format", "registers"]
