"""The serve config: defaults, the example file, errors that name the field, the builder and the Ray Serve form."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from quantserve.runtime.kernel_policy import validate_kernel_policy
from quantserve.serve.app import (
    IMPORT_PATH,
    build_app,
    config_from_args,
    ray_serve_config,
)
from quantserve.serve.config import (
    ConfigError,
    VariantConfig,
    default_config,
    load_config,
    parse_config,
)
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "serve.yaml"


def test_default_config_is_the_embedded_model_in_bf16_and_nf4_split_evenly() -> None:
    cfg = default_config()
    assert cfg.variant_names == ["bf16", "nf4"]
    assert [v.model for v in cfg.variants] == [None, None]
    assert [v.quantization_spec() for v in cfg.variants] == [None, "nf4"]
    assert cfg.experiment.resolved_weights(cfg.variant_names) == {"bf16": 0.5, "nf4": 0.5}


def test_example_config_loads() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.variant_names == ["bf16", "nf4"]
    assert cfg.variant("nf4").autoscaling.max_replicas == 2
    assert cfg.experiment.sticky_key == "user"


def test_flux_example_config_loads() -> None:
    cfg = load_config(EXAMPLE.with_name("serve-flux.yaml"))
    assert cfg.variant_names == ["bf16", "nf4-int8"]
    assert cfg.variant("nf4-int8").quantization_spec() == {"transformer": "nf4", "text_encoder_2": "int8wo"}
    assert cfg.variant("nf4-int8").scheme_label == "transformer=nf4,text_encoder_2=int8wo"
    limits = cfg.variant_limits("nf4-int8")
    assert (limits.default_width, limits.default_height, limits.default_steps) == (1024, 1024, 4)


@pytest.mark.parametrize(("data", "message"), [
    ({"variants": []}, "variants: List should have at least 1 item"),
    ({}, "variants: Field required"),
    ({"variants": [{"name": "a", "quantization": "nf5"}]}, "variants.0.quantization: unknown scheme 'nf5'"),
    ({"variants": [{"name": "a", "quantization": {"quant_method": "nope"}}]}, "variants.0.quantization"),
    ({"variants": [{"name": "a b"}]}, "variants.0.name: String should match pattern"),
    ({"variants": [{"name": "a", "colour": 1}]}, "variants.0.colour: Extra inputs are not permitted"),
    ({"variants": [{"name": "a", "max_queued_requests": -1}]}, "variants.0.max_queued_requests"),
    ({"variants": [{"name": "a", "resources": {"num_cpus": -1}}]}, "variants.0.resources.num_cpus"),
    ({"variants": [{"name": "a", "autoscaling": {"min_replicas": 3, "max_replicas": 2}}]},
     "variants.0.autoscaling: max_replicas (2) must be >= min_replicas (3)"),
    ({"variants": [{"name": "a", "kernel_policy": {"force": {"attn": "no such kernel"}}}]},
     "variants.0.kernel_policy.force.attn: expected a kernel name"),
    ({"variants": [{"name": "a", "kernel_policy": {"disable": {"attn": []}}}]},
     "variants.0.kernel_policy.disable.attn: expected a non-empty list"),
    ({"variants": [{"name": "a", "kernel_policy": {"prefer": {}}}]}, "variants.0.kernel_policy: unknown key(s) 'prefer'"),
    ({"variants": [{"name": "a"}, {"name": "a"}]}, "variants: duplicate name(s) a"),
    ({"variants": [{"name": "a"}], "experiment": {"weights": {"b": 1}}}, "experiment.weights: unknown variant(s) 'b'"),
    ({"variants": [{"name": "a"}], "experiment": {"weights": {"a": -1}}}, "experiment.weights"),
    ({"variants": [{"name": "a"}], "experiment": {"weights": {"a": 0}}}, "experiment.weights: at least one variant"),
    ({"variants": [{"name": "a"}], "experiment": {"shadow": {"variant": "z"}}}, "experiment.shadow.variant: unknown variant 'z'"),
    ({"variants": [{"name": "a"}], "experiment": {"shadow": {"sample_rate": 2}}}, "experiment.shadow.sample_rate"),
    ({"variants": [{"name": "a"}], "experiment": {"sticky_key": "cookie"}}, "experiment.sticky_key: got 'cookie'"),
    ({"variants": [{"name": "a"}], "http": {"port": 70000}}, "http.port"),
    ({"variants": [{"name": "a"}], "router": {"num_replicas": 2}}, "router: the A/B router runs inside the Ingress"),
    ({"variants": [{"name": "a"}], "limits": {"max_n": 0}}, "limits.max_n"),
    ({"variants": [{"name": "a", "batching": {"max_batch_images": 2}}], "limits": {"max_n": 4}},
     "variants.0.batching.max_batch_images (2) must be >= limits.max_n (4)"),
    ({"variants": [{"name": "a", "quantization": {"transformer": "nf5"}}]},
     "variants.0.quantization: transformer: unknown scheme 'nf5'"),
    ({"variants": [{"name": "a", "quantization": {"text encoder": "nf4"}}]},
     "variants.0.quantization: text encoder: a component name"),
    ({"variants": [{"name": "a", "quantization": {"transformer": ["nf4"]}}]},
     "variants.0.quantization: transformer: expected a scheme name, a quantization_config block or null"),
    ({"variants": [{"name": "a", "quantization": {"transformer": {"quant_method": "nope"}}}]},
     "variants.0.quantization: transformer: "),
    ({"variants": [{"name": "a", "quantization": {}}]}, "variants.0.quantization: an empty mapping"),
    ({"variants": [{"name": "a", "quantization": {"quant_backend": "bitsandbytes_5bit"}}]},
     "variants.0.quantization: PipelineQuantizationConfig.quant_backend"),
    ({"variants": [{"name": "a", "quantization": {"quant_mapping": {"transformer": "nf5"}}}]},
     "variants.0.quantization: quant_mapping.transformer: unknown scheme 'nf5'"),
    ({"variants": [{"name": "a", "dtype": "float64"}]}, "variants.0.dtype"),
    ({"variants": [{"name": "a", "limits": {"max_n": 8}}], "limits": {"max_n": 4}},
     "variants.0.limits.max_n (8) must be <= limits.max_n (4)"),
    ({"variants": [{"name": "a", "limits": {"default_size": "64"}}]}, "variants.0.limits.default_size"),
    ({"variants": [{"name": "a", "limits": {"default_size": "1024x64"}}]},
     "variants.0.limits.default_size (1024x64): each side must lie in [8, 512]"),
    ({"variants": [{"name": "a", "limits": {"max_steps": 10, "default_steps": 20}}]},
     "variants.0.limits.default_steps (20) must be <= max_steps (10)"),
    ({"variants": [{"name": "a", "limits": {"max_n": 4}, "batching": {"max_batch_images": 2}}], "limits": {"max_n": 8}},
     "variants.0.batching.max_batch_images (2) must be >= variants.0.limits.max_n (4)"),
])
def test_errors_name_the_field(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert message in str(info.value), str(info.value)


def test_every_quantization_form_load_pipeline_takes() -> None:
    pairs = [
        ("nf4", "nf4"), ("bf16", "bf16"), (None, "bf16"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, "bitsandbytes"),
        ({"transformer": "nf4", "text_encoder_2": "int8wo", "text_encoder": None},
         "transformer=nf4,text_encoder_2=int8wo"),
        ({"transformer": {"quant_method": "quanto", "weights_dtype": "int8"}}, "transformer=quanto"),
        ({"quant_backend": "bitsandbytes_4bit", "quant_kwargs": {"bnb_4bit_quant_type": "nf4"},
          "components_to_quantize": ["transformer", "text_encoder_2"]}, "bitsandbytes_4bit:transformer,text_encoder_2"),
        ({"quant_mapping": {"transformer": "nf4", "text_encoder_2": "int8wo"}}, "transformer=nf4,text_encoder_2=int8wo"),
    ]
    for quantization, label in pairs:
        cfg = parse_config({"variants": [{"name": "a", "quantization": quantization}]})
        assert cfg.variants[0].scheme_label == label


def test_a_variant_limits_are_its_own_over_the_apps() -> None:
    cfg = parse_config({"variants": [{"name": "a", "limits": {"max_n": 2, "max_steps": 8, "default_size": "96x64",
                                                             "max_prompt_chars": 300}},
                                     {"name": "b"}],
                        "limits": {"max_n": 4, "max_steps": 50, "default_steps": 25}})
    a, b = cfg.variant_limits("a"), cfg.variant_limits("b")
    assert (a.max_n, a.max_steps, a.default_steps, a.default_width, a.default_height) == (2, 8, 8, 96, 64)
    assert a.max_prompt_chars == 300 and a.max_size == 512
    assert (b.max_n, b.max_steps, b.default_steps, b.default_width, b.default_height) == (4, 50, 25, 64, 64)


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("variants: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(scalar)


def test_builder_takes_nothing_a_file_or_an_inline_config(tmp_path: Path) -> None:
    assert isinstance(build_app({}), Application)
    assert config_from_args({"config": str(EXAMPLE)}).variant_names == ["bf16", "nf4"]
    inline = config_from_args({"variants": [{"name": "only", "quantization": "int8wo"}]})
    assert inline.variant_names == ["only"]
    with pytest.raises(ConfigError, match="cannot be combined"):
        config_from_args({"config": str(EXAMPLE), "app_name": "x"})


def test_ray_serve_config_keeps_the_experiment_out_of_the_code_version() -> None:
    cfg = default_config()
    ray_cfg = ray_serve_config(cfg)
    ServeDeploySchema.model_validate(ray_cfg)  # Ray's own schema accepts it
    app = ray_cfg["applications"][0]
    assert app["import_path"] == IMPORT_PATH
    assert "experiment" not in app["args"] and "http" not in app["args"]
    assert app["deployments"] == [{"name": "Ingress", "user_config": cfg.experiment.model_dump(mode="json")}]
    assert ray_cfg["http_options"] == {"host": "127.0.0.1", "port": 8000}
    # the builder takes the args back (the router's user_config then overrides the default experiment)
    assert config_from_args(app["args"]).variant_names == cfg.variant_names
    yaml.safe_dump(ray_cfg)  # plain data: writes as a Ray Serve config file


def test_kernel_policy_normal_form() -> None:
    policy = validate_kernel_policy({"force": {"proj_out_*": "reference"}, "disable": {"*attn1*": "native"}})
    assert policy == {"force": {"proj_out_*": "reference"}, "disable": {"*attn1*": ["native"]}}
    assert validate_kernel_policy({}) == {} and validate_kernel_policy(None) == {}
    with pytest.raises(ValueError, match="expected a mapping"):
        validate_kernel_policy(["native"])


def test_kernel_policy_takes_every_form_the_runtime_takes() -> None:
    """One schema (quantserve.runtime.kernel_policy): a list under `disable` disables those kernels everywhere."""
    assert validate_kernel_policy({"disable": ["native", "cpu_fused"]}) == {"disable": {"*": ["native", "cpu_fused"]}}
    variant = VariantConfig(name="a", kernel_policy={"disable": ["native"]})
    assert variant.kernel_policy == {"disable": {"*": ["native"]}}


def test_autoscaling_policies_and_scale_to_zero_reach_ray_serve() -> None:
    from ray.serve.config import AutoscalingConfig as RayAutoscaling

    from quantserve.serve.config import AutoscalingConfig

    work = AutoscalingConfig(policy="work", target_wait_s=1.5, min_replicas=0, max_replicas=3,
                             downscale_to_zero_delay_s=30)
    ray_config = RayAutoscaling(**work.to_ray())  # Ray's own validation accepts it
    assert ray_config.min_replicas == 0 and ray_config.initial_replicas == 1  # the deploy still proves it loads
    assert ray_config.downscale_to_zero_delay_s == 30
    assert ray_config.policy.policy_function == "quantserve.serve.autoscaling:WorkAwarePolicy"
    assert ray_config.policy.policy_kwargs["target_wait_s"] == 1.5
    requests_policy = RayAutoscaling(**AutoscalingConfig(min_replicas=2, max_replicas=4).to_ray())
    assert requests_policy.initial_replicas == 2 and "quantserve" not in str(requests_policy.policy.policy_function)
    # Ray 2.60 pushes replica and handle figures every metrics_interval_s (its default 10 s): set to 1 s here
    assert ray_config.metrics_interval_s == 1.0 and requests_policy.metrics_interval_s == 1.0


@pytest.mark.parametrize("autoscaling, message", [
    ({"policy": "queue"}, "variants.0.autoscaling.policy"),
    ({"target_wait_s": 0}, "variants.0.autoscaling.target_wait_s"),
    ({"min_replicas": 1, "downscale_to_zero_delay_s": 10}, "downscale_to_zero_delay_s needs min_replicas: 0"),
    ({"min_replicas": -1}, "variants.0.autoscaling.min_replicas"),
    ({"look_back_period_s": 2, "metrics_interval_s": 2}, "look_back_period_s .* must be greater than metrics_interval_s"),
    ({"metrics_interval_s": 0}, "variants.0.autoscaling.metrics_interval_s"),
])
def test_bad_autoscaling_names_the_field(autoscaling: dict, message: str) -> None:
    from quantserve.serve.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=message):
        parse_config({"variants": [{"name": "nf4", "quantization": "nf4", "autoscaling": autoscaling}]})


def test_custom_resources_reach_the_replicas_ray_actor_options() -> None:
    cfg = parse_config({"variants": [
        {"name": "gpu", "resources": {"num_cpus": 0, "custom": {"fake_gpu": 1, "accelerator_type:L4": 0.5}}},
        {"name": "plain"}]})
    assert cfg.variants[0].ray_actor_options() == {"num_cpus": 0, "num_gpus": 0,
                                                   "resources": {"fake_gpu": 1, "accelerator_type:L4": 0.5}}
    assert "resources" not in cfg.variants[1].ray_actor_options()  # none asked for: Ray's own options as before
    # the Ray Serve form carries them to the builder, which binds them into the variant's deployment
    args = ray_serve_config(cfg)["applications"][0]["args"]
    assert args["variants"][0]["resources"]["custom"] == {"fake_gpu": 1, "accelerator_type:L4": 0.5}
    deployment = config_from_args(args).variants[0]
    assert deployment.ray_actor_options()["resources"] == {"fake_gpu": 1, "accelerator_type:L4": 0.5}


@pytest.mark.parametrize("custom, message", [
    ({"": 1}, "non-empty name"),
    ({" ": 1}, "non-empty name"),
    ({"CPU": 1}, "'CPU' is Ray's own resource, not a custom one: use resources.num_cpus"),
    ({"GPU": 1}, "'GPU' is Ray's own resource, not a custom one: use resources.num_gpus"),
    ({"memory": 1e9}, "'memory' is Ray's own resource"),
    ({"object_store_memory": 1e9}, "'object_store_memory' is Ray's own resource"),
    ({"fake_gpu": 0}, "fake_gpu: the amount must be > 0 and <= 1024"),
    ({"fake_gpu": -1}, "fake_gpu: the amount must be > 0 and <= 1024"),
    ({"fake_gpu": 1025}, "fake_gpu: the amount must be > 0 and <= 1024"),
    ({"fake_gpu": float("inf")}, "fake_gpu: the amount must be > 0 and <= 1024"),
    ({"fake_gpu": "one"}, "variants.0.resources.custom.fake_gpu"),
    (["fake_gpu"], "variants.0.resources.custom"),
])
def test_bad_custom_resources_name_the_field(custom: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"variants": [{"name": "a", "resources": {"custom": custom}}]})
    assert "variants.0.resources.custom" in str(info.value) and message in str(info.value), str(info.value)
