"""The form of a variant's kernel policy: {"force": {PATTERN: KERNEL}, "disable": {PATTERN: [KERNEL, ...]}}.

Patterns are fnmatch globs over the dotted layer name. The runtime's router applies the policy while loading
(`load_model(..., kernel_policy=...)`) and checks the kernel names against the candidates registered where the
replica runs (a name it does not know fails that variant's start with the runtime's message). Here only the shape
is checked, so a config error names its field before anything starts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

POLICY_KEYS = ("force", "disable")
KERNEL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def validate_kernel_policy(policy: Any, field_name: str = "kernel_policy") -> dict[str, dict[str, Any]]:
    """The policy in its normal form (disable lists are lists); a ValueError names the bad key, pattern or kernel."""
    if policy is None:
        return {}
    if not isinstance(policy, Mapping):
        raise ValueError(f"{field_name}: expected a mapping with keys {', '.join(POLICY_KEYS)}, "
                         f"got {type(policy).__name__}")
    unknown = [k for k in policy if k not in POLICY_KEYS]
    if unknown:
        raise ValueError(f"{field_name}: unknown key(s) {', '.join(map(repr, unknown))}; "
                         f"accepted: {', '.join(POLICY_KEYS)}")
    result: dict[str, dict[str, Any]] = {}
    force = policy.get("force") or {}
    if not isinstance(force, Mapping):
        raise ValueError(f"{field_name}.force: expected a mapping layer pattern -> kernel name")
    for pattern, kernel in force.items():
        _check_pattern(pattern, f"{field_name}.force")
        _check_kernel(kernel, f"{field_name}.force.{pattern}")
    disable = policy.get("disable") or {}
    if not isinstance(disable, Mapping):
        raise ValueError(f"{field_name}.disable: expected a mapping layer pattern -> list of kernel names")
    normal_disable: dict[str, list[str]] = {}
    for pattern, kernels in disable.items():
        _check_pattern(pattern, f"{field_name}.disable")
        kernels = [kernels] if isinstance(kernels, str) else kernels
        if not isinstance(kernels, list) or not kernels:
            raise ValueError(f"{field_name}.disable.{pattern}: expected a non-empty list of kernel names, "
                             f"got {kernels!r}")
        for kernel in kernels:
            _check_kernel(kernel, f"{field_name}.disable.{pattern}")
        normal_disable[pattern] = list(kernels)
    if force:
        result["force"] = dict(force)
    if normal_disable:
        result["disable"] = normal_disable
    return result


def _check_pattern(pattern: Any, field_name: str) -> None:
    if not isinstance(pattern, str) or not pattern or len(pattern) > 200:
        raise ValueError(f"{field_name}: a layer pattern is a non-empty string of at most 200 characters, "
                         f"got {pattern!r}")


def _check_kernel(kernel: Any, field_name: str) -> None:
    if not isinstance(kernel, str) or not KERNEL_NAME.match(kernel):
        raise ValueError(f"{field_name}: expected a kernel name such as 'native' or 'reference', got {kernel!r}")
