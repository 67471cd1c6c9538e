"""The chart's serveConfigV2 is the serve config of `quantserve serve`: it parses with the project's pydantic model and
with Ray's ServeDeploySchema, has the shape of `--print-ray-config`, and an experiment change touches nothing else."""

from __future__ import annotations

import copy
import io
import json
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from quantserve.serve import app, rayservice
from quantserve.serve.config import ConfigError, ExperimentConfig, ServeConfig, load_config, parse_config

from .chart import CHART, ROOT, manifests, merged, one, render, serve_config_v2, values_cases

CASES = values_cases()
IDS = [case_id for case_id, _ in CASES]


def _chart_serve_values(values: dict[str, Any] | None) -> dict[str, Any]:
    """The `serve` values Helm uses: the chart's defaults coalesced with the case's (lists replace, maps merge)."""
    with helm.Chart.load(CHART) as chart:
        return chart.merge_values(values)["serve"]


@pytest.mark.parametrize("case_id,values", CASES, ids=IDS)
def test_serve_config_v2_is_a_valid_ray_serve_config(case_id: str, values: dict[str, Any] | None):
    ray_config = serve_config_v2(manifests(values))
    schema = ServeDeploySchema.model_validate(ray_config)
    [application] = schema.applications
    assert application.import_path == app.IMPORT_PATH
    assert [d.name for d in application.deployments] == [app.EXPERIMENT_DEPLOYMENT]
    assert schema.http_options.host == rayservice.CLUSTER_HOST


@pytest.mark.parametrize("case_id,values", CASES, ids=IDS)
def test_serve_config_v2_parses_with_the_serve_config_model_and_equals_the_values(case_id: str, values: dict | None):
    docs = manifests(values)
    cfg = rayservice.serve_config_from_v2(serve_config_v2(docs), metrics_port=rayservice.metrics_port_of(
        one(docs, "RayService")))
    assert isinstance(cfg, ServeConfig)
    from_values = parse_config(_chart_serve_values(values), "values.serve")
    assert cfg == from_values


@pytest.mark.parametrize("case_id,values", CASES, ids=IDS)
def test_serve_config_v2_has_the_shape_of_print_ray_config(case_id: str, values: dict[str, Any] | None):
    # `quantserve serve CONFIG --print-ray-config` prints app.ray_serve_config(cfg): the chart gives the same document,
    # except that it leaves out what equals the defaults (args and user_config pass through the same pydantic model).
    rendered = serve_config_v2(manifests(values))
    cfg = rayservice.serve_config_from_v2(rendered)
    normalised = copy.deepcopy(rendered)
    application = normalised["applications"][0]
    application["args"] = parse_config(application["args"], "args").model_dump(
        mode="json", exclude={"experiment", "http", "metrics"})
    router = application["deployments"][0]
    router["user_config"] = ExperimentConfig.model_validate(router["user_config"]).model_dump(mode="json")
    assert normalised == app.ray_serve_config(cfg)


def test_serve_config_v2_is_a_yaml_block_in_the_rayservice():
    rs = one(manifests(), "RayService")
    assert isinstance(rs["spec"]["serveConfigV2"], str) and rs["spec"]["serveConfigV2"].startswith("proxy_location:")


def test_changing_the_experiment_changes_only_the_routers_user_config():
    # `helm upgrade` with new weights: KubeRay sees only serveConfigV2 change (no new Ray cluster), and Ray Serve sees
    # only the Ingress's user_config change (a lightweight update: reconfigure() on the live replica, no restart)
    before = merged(None, **{"serve.experiment.weights": {"bf16": 0.5, "nf4": 0.5}})
    after = merged(None, **{"serve.experiment.weights": {"bf16": 0.9, "nf4": 0.1}, "serve.experiment.salt": "ab-2",
                            "serve.experiment.shadow": {"variant": "bf16", "sample_rate": 0.05}})
    old_docs, new_docs = manifests(before, revision=1), manifests(after, revision=2)
    old_rs, new_rs = one(old_docs, "RayService"), one(new_docs, "RayService")
    assert old_rs["spec"]["rayClusterConfig"] == new_rs["spec"]["rayClusterConfig"]
    assert {k: v for k, v in old_rs["spec"].items() if k != "serveConfigV2"} == \
           {k: v for k, v in new_rs["spec"].items() if k != "serveConfigV2"}
    old_v2, new_v2 = serve_config_v2(old_docs), serve_config_v2(new_docs)
    old_router = old_v2["applications"][0]["deployments"][0].pop("user_config")
    new_router = new_v2["applications"][0]["deployments"][0].pop("user_config")
    assert old_v2 == new_v2  # args, import path, http: untouched, so no deployment but the router is reconfigured
    assert old_router["weights"] == {"bf16": 0.5, "nf4": 0.5}
    assert new_router == {"weights": {"bf16": 0.9, "nf4": 0.1}, "salt": "ab-2", "sticky_key": "user",
                          "shadow": {"variant": "bf16", "sample_rate": 0.05}}
    ExperimentConfig.model_validate(new_router).check(["bf16", "nf4"])  # what Ingress.reconfigure accepts
    assert [d["kind"] for d in old_docs] == [d["kind"] for d in new_docs]


def test_examples_serve_yaml_moves_to_the_chart_unchanged():
    # `python -m quantserve.serve.rayservice values examples/serve.yaml` gives the chart's `serve:` block
    cfg = load_config(ROOT / "examples" / "serve.yaml")
    block = rayservice.chart_values(cfg)
    values = merged(None, serve=block, **{"gpuWorkers.enabled": False, "extraWorkerGroups": [{"groupName": "cpu"}]})
    deployed = rayservice.serve_config_from_v2(serve_config_v2(manifests(values)), metrics_port=cfg.metrics.port)
    expected = cfg.model_copy(update={"http": cfg.http.model_copy(update={"host": "0.0.0.0"})})
    assert deployed == expected


def test_import_path_and_router_name_match_the_app():
    assert (rayservice.IMPORT_PATH, rayservice.EXPERIMENT_DEPLOYMENT) == (app.IMPORT_PATH, app.EXPERIMENT_DEPLOYMENT)


def test_values_schema_serve_part_is_generated_from_the_serve_config_model():
    # regenerate with: python -m quantserve.serve.rayservice schema helm/quantserve/values.schema.json
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["properties"]["serve"] == rayservice.serve_values_schema()


@pytest.mark.parametrize("document,message", [
    ({"applications": []}, "expected exactly one application"),
    ({"applications": [{"name": "q", "import_path": rayservice.IMPORT_PATH, "args": {"config": "/etc/q.yaml"}}]},
     "args.config"),
    ({"applications": [{"name": "q", "import_path": rayservice.IMPORT_PATH, "args": {"variants": [{"name": "a"}]},
                        "deployments": [{"name": "Diffusion_a", "num_replicas": 3}]}]}, "only {name: Ingress"),
    ({"applications": [{"name": "q", "import_path": rayservice.IMPORT_PATH,
                        "args": {"variants": [{"name": "a"}], "experiment": {}}}]}, "belong outside args"),
    ({"applications": [{"name": "q", "import_path": rayservice.IMPORT_PATH, "args": {"variants": [{"name": "a"}]},
                        "deployments": [{"name": "Ingress", "user_config": {"weights": {"b": 1}}}]}]},
     "experiment.weights: unknown variant(s) 'b'"),
    # a config rendered before issue 13 (the experiment on an ABRouter deployment) is still read
    ({"applications": [{"name": "q", "import_path": rayservice.IMPORT_PATH, "args": {"variants": [{"name": "a"}]},
                        "deployments": [{"name": "ABRouter", "user_config": {"weights": {"b": 1}}}]}]},
     "experiment.weights: unknown variant(s) 'b'"),
    ("applications: [", "not valid YAML"),
])
def test_serve_config_from_v2_names_what_is_wrong(document: Any, message: str):
    with pytest.raises(ConfigError) as info:
        rayservice.serve_config_from_v2(document)
    assert message in str(info.value)


def _run(*argv: str, stdin: str | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    old_stdin = sys.stdin
    try:
        if stdin is not None:
            sys.stdin = io.StringIO(stdin)
        with redirect_stdout(out), redirect_stderr(err):
            code = rayservice.main(list(argv))
    finally:
        sys.stdin = old_stdin
    return code, out.getvalue(), err.getvalue()


def test_cli_values_check_and_schema(tmp_path: Path):
    code, out, _ = _run("values", str(ROOT / "examples" / "serve.yaml"))
    assert code == 0 and yaml.safe_load(out)["serve"]["http"]["host"] == "0.0.0.0"
    rendered = "\n---\n".join(render(None)[k] for k in sorted(render(None)) if k.endswith(".yaml"))
    code, out, _ = _run("check", "-", stdin=rendered)
    assert code == 0 and "RayService qs-quantserve: app quantserve: bf16 (bf16" in out
    assert "split bf16 50%, nf4 50%" in out
    bad_docs = manifests(merged(None, **{"serve.experiment.weights": {"bf16": 1}}))
    one(bad_docs, "RayService")["spec"]["serveConfigV2"] = one(bad_docs, "RayService")["spec"]["serveConfigV2"] \
        .replace("bf16: 1", "nf5: 1")
    code, _, err = _run("check", "-", stdin=yaml.safe_dump_all(bad_docs))
    assert code == 1 and "unknown variant(s) 'nf5'" in err, err
    copy_of_schema = tmp_path / "values.schema.json"
    copy_of_schema.write_text((CHART / "values.schema.json").read_text())
    assert _run("schema", str(copy_of_schema), "--check")[0] == 0
    doc = json.loads(copy_of_schema.read_text())
    doc["properties"]["serve"]["properties"].pop("app_name")
    copy_of_schema.write_text(json.dumps(doc))
    assert _run("schema", str(copy_of_schema), "--check")[0] == 1
    assert _run("schema", str(copy_of_schema))[0] == 0
    assert _run("schema", str(copy_of_schema), "--check")[0] == 0
