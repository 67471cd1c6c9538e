"""The form of a kernel policy, checked in one place: {"force": {PATTERN: KERNEL}, "disable": {PATTERN: [KERNEL, ...]}}.

Patterns are fnmatch globs over the dotted layer name. `disable` may also be a list of kernel names (every layer:
{"*": [...]}) and a pattern's kernels a single name. `validate_kernel_policy` checks the shape and returns the normal
form; whether a kernel name exists is checked against the registered candidates where the policy is applied (the
router), so a serve config can name a kernel that only the replica's machine registers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

POLICY_KEYS = ("force", "disable")
KERNEL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_PATTERN_CHARS = 200


def validate_kernel_policy(policy: Any, field_name: str = "kernel_policy") -> dict[str, dict[str, Any]]:
    """The policy in its normal form (disable: pattern -> list); a ValueError names the bad key, pattern or kernel."""
    if policy is None:
        return {}
    if not isinstance(policy, Mapping):
        raise ValueError(f"{field_name}: expected a mapping with keys {', '.join(POLICY_KEYS)}, "
                         f"got {type(policy).__name__}")
    unknown = [k for k in policy if k not in POLICY_KEYS]
    if unknown:
        raise ValueError(f"{field_name}: unknown key(s) {', '.join(map(repr, unknown))}; "
                         f"accepted: {', '.join(POLICY_KEYS)} (unknown keys are refused, not ignored)")
    result: dict[str, dict[str, Any]] = {}
    force = _force(policy.get("force") or {}, f"{field_name}.force")
    disable = _disable(policy.get("disable") or {}, f"{field_name}.disable")
    if force:
        result["force"] = force
    if disable:
        result["disable"] = disable
    return result


def _force(force: Any, field_name: str) -> dict[str, str]:
    if not isinstance(force, Mapping):
        raise ValueError(f"{field_name}: expected a mapping layer pattern -> kernel name")
    for pattern, kernel in force.items():
        _check_pattern(pattern, field_name)
        _check_kernel(kernel, f"{field_name}.{pattern}")
    return dict(force)


def _disable(disable: Any, field_name: str) -> dict[str, list[str]]:
    if isinstance(disable, (list, tuple)):  # a list of kernel names: disabled for every layer
        disable = {"*": list(disable)}
    if not isinstance(disable, Mapping):
        raise ValueError(f"{field_name}: expected a mapping layer pattern -> list of kernel names, "
                         "or a list of kernel names")
    normal: dict[str, list[str]] = {}
    for pattern, kernels in disable.items():
        _check_pattern(pattern, field_name)
        kernels = [kernels] if isinstance(kernels, str) else kernels
        if not isinstance(kernels, (list, tuple)) or not kernels:
            raise ValueError(f"{field_name}.{pattern}: expected a non-empty list of kernel names, got {kernels!r}")
        for kernel in kernels:
            _check_kernel(kernel, f"{field_name}.{pattern}")
        normal[pattern] = list(kernels)
    return normal


def _check_pattern(pattern: Any, field_name: str) -> None:
    if not isinstance(pattern, str) or not pattern or len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"{field_name}: a layer pattern is a non-empty string of at most {MAX_PATTERN_CHARS} "
                         f"characters, got {pattern!r}")


def _check_kernel(kernel: Any, field_name: str) -> None:
    if not isinstance(kernel, str) or not KERNEL_NAME.match(kernel):
        raise ValueError(f"{field_name}: expected a kernel name such as 'native' or 'reference', got {kernel!r}")
