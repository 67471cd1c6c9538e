"""End to end over real HTTP: a tiny FLUX pipeline served unquantized and with {transformer: nf4, text_encoder_2:
int8wo}, asked through OpenAI's own client; the served images equal the in-process ones bit for bit; streaming."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from .conftest import RunningApp
from .helpers import T2I_QUANTIZATION, T2I_THREADS, decode_b64_png, t2i_variants

VARIANT = "X-Quantserve-Variant"
FORCE = "X-Quantserve-Force-Variant"


@pytest.fixture(scope="module")
def client(t2i_app: RunningApp):
    import openai

    return openai.OpenAI(base_url=f"{t2i_app.url}/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def in_process() -> Iterator[dict[str, object]]:
    """The same two variants loaded in this process, with the replicas' torch threads."""
    from quantserve.serve.config import VariantConfig, parse_config
    from quantserve.serve.generation import BatchGenerator, load_variant

    from .helpers import make_t2i_config

    threads = torch.get_num_threads()
    torch.set_num_threads(T2I_THREADS)
    cfg = parse_config(make_t2i_config(1))
    try:
        yield {v["name"]: BatchGenerator(load_variant(VariantConfig.model_validate(v), cfg.variant_limits(v["name"])))
               for v in t2i_variants()}
    finally:
        torch.set_num_threads(threads)


def pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"))


def test_openai_client_gets_pngs_of_a_non_square_size(client, t2i_app: RunningApp) -> None:
    result = client.images.generate(prompt="a red car", n=2, size="64x32", response_format="b64_json",
                                    extra_body={"steps": 2, "seed": 1, "max_sequence_length": 32})
    assert len(result.data) == 2
    for item in result.data:
        image = decode_b64_png(item.b64_json)
        assert image.format == "PNG" and image.size == (64, 32)  # width x height
    raw = client.images.with_raw_response.generate(prompt="a blue cat", model="flux-nf4", size="32x48",
                                                   extra_body={"steps": 2, "negative_prompt": "blurry"})
    assert raw.headers[VARIANT] == "flux-nf4"
    assert decode_b64_png(raw.parse().data[0].b64_json).size == (32, 48)


def test_a_size_the_pipeline_cannot_make_is_422_naming_size(client, t2i_app: RunningApp) -> None:
    import openai

    with pytest.raises(openai.UnprocessableEntityError, match=r"size: each side must be a multiple of 16 for "
                                                              r"FluxPipeline") as info:
        client.images.generate(prompt="a red car", size="40x32", extra_body={"steps": 1})
    assert info.value.body["param"] == "size"
    with pytest.raises(openai.UnprocessableEntityError, match="max_sequence_length: must be between 1 and 512"):
        client.images.generate(prompt="a red car", extra_body={"steps": 1, "max_sequence_length": 4096})
    r = t2i_app.post({"prompt": "a red car", "steps": 1, "clip_skip": 2})  # no family takes it: the Ingress says so
    assert r.status_code == 422 and r.json()["error"]["param"] == "clip_skip"
    assert "max_sequence_length" in r.json()["error"]["message"]


@pytest.mark.parametrize("variant", ["flux", "flux-nf4"])
def test_served_image_equals_the_in_process_one(t2i_app: RunningApp, in_process: dict, variant: str) -> None:
    body = {"prompt": "a red car", "n": 2, "size": "48x32", "steps": 3, "seed": 11, "guidance": 2.5,
            "negative_prompt": "blurry", "true_cfg_scale": 2.0}
    r = t2i_app.post(body, headers={FORCE: variant})
    assert r.status_code == 200, r.text
    served = [base64.b64decode(item["b64_json"]) for item in r.json()["data"]]
    job = {**{k: body[k] for k in ("prompt", "n", "size", "steps", "seed", "guidance", "negative_prompt")},
           "extras": {"true_cfg_scale": 2.0}}
    outcomes, _ = in_process[variant].run([job])
    local = outcomes[0]["images"]
    assert len(served) == len(local) == 2
    for a, b in zip(served, local):
        assert np.array_equal(pixels(a), pixels(b))
    assert served == local  # the PNG bytes too
    assert pixels(served[0]).std() > 0 and not np.array_equal(pixels(served[0]), pixels(served[1]))  # seeds 11, 12


def test_models_list_the_pipeline_its_components_and_request_fields(t2i_app: RunningApp) -> None:
    models = {m["id"]: m for m in t2i_app.get("/v1/models").json()["data"]}
    assert set(models) == {"flux", "flux-nf4"}
    plain, quant = models["flux"], models["flux-nf4"]
    assert plain["family"] == quant["family"] == "text-to-image"
    assert plain["pipeline_class"] == "FluxPipeline" and plain["size_multiple"] == 16
    assert set(plain["extras"]) == {"max_sequence_length", "true_cfg_scale"} and plain["negative_prompt"] is True
    assert plain["backend"] == "none" and plain["quantization_config"] is None
    assert quant["scheme"] == "transformer=nf4,text_encoder_2=int8wo"
    assert quant["backend"] == "bitsandbytes" and quant["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    components = quant["components"]
    assert components["transformer"]["backend"] == "bitsandbytes"
    assert components["text_encoder_2"]["backend"] == "torchao" and components["text_encoder_2"]["quantized"] > 0
    assert components["text_encoder"]["backend"] == "none"
    assert quant["model_bytes"] < plain["model_bytes"]
    assert set(T2I_QUANTIZATION) <= {n for n, c in components.items() if c["quantized"]}


def _events(response: requests.Response) -> list[tuple[str, dict]]:
    events, name = [], None
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            events.append((name, json.loads(line.removeprefix("data: "))))
    return events


def test_streaming_sends_one_event_per_step_then_the_image(t2i_app: RunningApp, in_process: dict) -> None:
    body = {"prompt": "a red car", "size": "32x48", "steps": 4, "seed": 5, "stream": True}
    with requests.post(f"{t2i_app.url}/v1/images/generations", json=body, headers={FORCE: "flux"}, stream=True,
                       timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers[VARIANT] == "flux"
        events = _events(r)
    assert [name for name, _ in events] == ["image_generation.progress"] * 4 + ["image_generation.completed"]
    assert [(e["step"], e["steps"]) for _, e in events[:4]] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    done = events[-1][1]
    assert done["type"] == "image_generation.completed" and done["size"] == "32x48"
    png = base64.b64decode(done["b64_json"])
    assert Image.open(io.BytesIO(png)).size == (32, 48)
    outcomes, _ = in_process["flux"].run([{k: v for k, v in body.items() if k != "stream"}])
    assert png == outcomes[0]["images"][0]  # a streamed image is the same image


def test_a_stream_closed_early_leaves_the_replica_serving(t2i_app: RunningApp) -> None:
    body = {"prompt": "a red car", "size": "32x32", "steps": 20, "seed": 5, "stream": True}
    with requests.post(f"{t2i_app.url}/v1/images/generations", json=body, headers={FORCE: "flux"}, stream=True,
                       timeout=60) as r:
        assert next(r.iter_lines(decode_unicode=True)) == "event: image_generation.progress"
    after = t2i_app.post({"prompt": "a red car", "steps": 1, "seed": 5}, headers={FORCE: "flux"})
    assert after.status_code == 200, after.text


def test_streaming_through_the_openai_client_and_its_errors(client, t2i_app: RunningApp) -> None:
    import openai

    stream = client.images.generate(prompt="a red car", size="32x32", n=2, stream=True,
                                    extra_body={"steps": 3, "seed": 2})
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.progress"] * 3 + ["image_generation.completed"] * 2
    assert [e.step for e in events[:3]] == [1, 2, 3]
    assert all(decode_b64_png(e.b64_json).size == (32, 32) for e in events[3:])
    with pytest.raises(openai.UnprocessableEntityError, match="size"):  # refused before the stream starts
        list(client.images.generate(prompt="a red car", size="40x40", stream=True, extra_body={"steps": 1}))
    r = t2i_app.post({"prompt": "a red car", "stream": True, "partial_images": 2})
    assert r.status_code == 422 and r.json()["error"]["param"] == "partial_images"


def test_redeploying_the_other_app_keeps_this_one(app: RunningApp, t2i_app: RunningApp) -> None:
    """A Ray Serve config lists every app of the cluster: a live experiment change of the digits app keeps the
    FLUX app deployed, on its own route prefix, with the same replicas."""
    from ray import serve

    from .helpers import APP_NAME, T2I_APP_NAME

    before = {m["id"]: m["replica"] for m in t2i_app.get("/v1/models").json()["data"]}
    with app.experiment(weights={"bf16": 0.0, "nf4": 1.0}):
        assert set(serve.status().applications) >= {APP_NAME, T2I_APP_NAME}
        r = t2i_app.post({"prompt": "a red car", "steps": 1})
        assert r.status_code == 200 and r.headers[VARIANT] == "flux"
    assert {m["id"]: m["replica"] for m in t2i_app.get("/v1/models").json()["data"]} == before
