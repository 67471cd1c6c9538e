"""The Dockerfile (no Docker engine here to build it): Docker's own parser reads it, and its pins agree with the
package, the chart and constraints.txt, so the image the chart runs is the one these tests describe."""

from __future__ import annotations

import re
from importlib import metadata
from typing import Any

import dockerfile
import yaml
from packaging.requirements import Requirement

from .chart import CHART, ROOT

DOCKERFILE = ROOT / "Dockerfile"


def _commands() -> list[Any]:
    return list(dockerfile.parse_file(str(DOCKERFILE)))  # BuildKit's Go parser


def _stages() -> list[list[Any]]:
    stages: list[list[Any]] = []
    for c in _commands():
        if c.cmd == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(c)
    return stages


def _image_constraints() -> dict[str, str]:
    text = DOCKERFILE.read_text()
    match = re.search(r"^COPY <<'EOF' /opt/constraints-image\.txt\n(.*?)^EOF$", text, re.M | re.S)
    assert match, "the Dockerfile's constraints-image.txt heredoc"
    pins = {}
    for line in match.group(1).splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints-image.txt: {line!r} is not pinned with =="
            pins[name.lower().replace("_", "-")] = version
    return pins


def _dependencies() -> list[Requirement]:
    """quantserve's runtime requirements, from its installed metadata (pyproject.toml's [project] dependencies)."""
    requirements = [Requirement(r) for r in metadata.requires("quantserve") or []]
    return [r for r in requirements if not (r.marker and "extra" in str(r.marker))]


def test_base_image_is_pinned_and_cuda():
    [arg] = [c for c in _commands() if c.cmd == "ARG" and c.value[0].startswith("CUDA_BASE=")]
    base = arg.value[0].split("=", 1)[1]
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-[a-z0-9-]+-ubuntu\d+\.\d+", base), base
    assert all(c.value[0] == "${CUDA_BASE}" for c in _commands() if c.cmd == "FROM")


def test_runs_as_the_non_root_user_the_chart_expects():
    final = _stages()[-1]
    [user] = [c for c in final if c.cmd == "USER"]
    uid, _, gid = user.value[0].partition(":")
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert int(uid) != 0 and int(uid) == values["podSecurityContext"]["runAsUser"]
    assert int(gid) == values["podSecurityContext"]["runAsGroup"]
    installs = " ".join(c.value[0] for c in final if c.cmd == "RUN")
    for tool in ("bash", "wget", "gcc", "python3.12-dev"):  # KubeRay's command and probes; Triton's launcher build
        assert re.search(rf"\b{re.escape(tool)}\b", installs), tool


def test_every_dependency_is_pinned_and_agrees_with_the_repository():
    pins = _image_constraints()
    dependencies = _dependencies()
    assert len(dependencies) >= 10
    for dep in dependencies:
        name = dep.name.lower().replace("_", "-")
        if name != "triton":  # torch pins its own triton
            assert name in pins, f"{name} (pyproject.toml) has no pin in the Dockerfile"
            assert dep.specifier.contains(pins[name], prereleases=True), (name, pins[name], str(dep))
    repo_pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                     if line and not line.startswith("#"))
    assert pins["torch"] == repo_pins["torch"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert pins["ray"] == values["rayVersion"], "the image's ray must equal the chart's rayVersion"
    assert f"ray.__version__ == '{pins['ray']}'" in DOCKERFILE.read_text()


def test_versions_agree_between_package_image_and_chart():
    version = metadata.version("quantserve")
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == version
    [label] = [c for c in _stages()[-1] if c.cmd == "LABEL"]
    labels = dict(zip(label.value[::2], (v.strip('"') for v in label.value[1::2]), strict=True))
    assert labels["org.opencontainers.image.version"] == version


def test_copied_sources_exist_and_pass_the_dockerignore():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    for c in _stages()[0]:
        if c.cmd == "COPY" and not c.flags and not c.value[0].startswith("<<"):
            for source in c.value[:-1]:
                assert (ROOT / source).exists(), source
                assert source.rstrip("/") in allowed, f"{source} is excluded by .dockerignore"
    readme = re.search(r'^readme = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert readme in allowed  # setuptools reads it while building the wheel


def test_default_command_serves_on_every_interface():
    [cmd] = [c for c in _stages()[-1] if c.cmd == "CMD"]
    assert cmd.json and cmd.value[:2] == ("quantserve", "serve") and "0.0.0.0" in cmd.value


def test_image_prefills_tritons_cache_for_named_targets_and_formats():
    """The runtime stage fills Triton's cache (TRITON_CACHE_DIR, owned by the serving user) with
    quantserve.kernels.prefill for the build args' targets and formats, which must be ones it knows."""
    from quantserve.kernels import aot

    runtime = _stages()[-1]
    args = dict(c.value[0].split("=", 1) for c in runtime if c.cmd == "ARG" and "=" in c.value[0])
    targets = args["TRITON_PREFILL_TARGETS"].split(",")
    formats = args["TRITON_PREFILL_FORMATS"].split(",")
    assert set(targets) <= set(aot.TARGETS) and {"sm_80", "sm_90"} <= set(targets)
    assert formats and set(formats) <= set(aot.format_names())
    env = [c.value for c in runtime if c.cmd == "ENV"]
    assert any(v[i] == "TRITON_CACHE_DIR" and v[i + 1] == "/var/cache/triton" for v in env
               for i in range(0, len(v) - 1, 2))
    [run] = [c for c in runtime if c.cmd == "RUN" and "quantserve.kernels.prefill" in c.value[0]]
    text = run.value[0]
    assert '--targets "$TRITON_PREFILL_TARGETS"' in text and '--formats "$TRITON_PREFILL_FORMATS"' in text
    assert "chown -R 1000:1000 /var/cache/triton" in text
    # the user the image runs as comes after: the cache it reads is its own
    users = [c.value[0] for c in runtime if c.cmd == "USER"]
    assert users == ["1000:1000"]
    assert runtime.index(run) < [c.cmd for c in runtime].index("USER")
