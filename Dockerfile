# syntax=docker/dockerfile:1.7
# quantserve's serving image: the package and Ray Serve on a CUDA base, run as a non-root user (uid 1000).
# One image for every Ray node of the helm/quantserve chart (head and workers), and for a single machine:
#
#   docker build -t registry.example.com/ml/quantserve:0.1.0 .
#   docker run --gpus all -p 8000:8000 -p 8080:8080 registry.example.com/ml/quantserve:0.1.0
#
# Pins: the CUDA base image by tag, pip and setuptools, and the Python packages in constraints-image.txt below (the
# versions the test suite runs with; ray must equal the chart's rayVersion). torch's PyPI wheel brings its own CUDA
# libraries, so the base only provides a CUDA runtime that matches the nodes' driver (CUDA 12.8: driver >= 570).
# KubeRay runs `ray start` through /bin/bash and probes the head with wget: both are here.

ARG CUDA_BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# --- build: a virtual environment with quantserve and its pinned dependencies -------------------------------------
FROM ${CUDA_BASE} AS build
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv python3.12-dev gcc g++ \
    && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
RUN python3.12 -m venv /opt/venv && pip install pip==26.3 setuptools==84.2.1

COPY <<'EOF' /opt/constraints-image.txt
# quantserve's dependencies (pyproject.toml) at the versions of the tested environment
torch==2.13.0
numpy==2.4.6
safetensors==0.8.0
accelerate==1.15.0
diffusers==0.42.1
transformers==5.25.0
tokenizers==0.23.3
sentencepiece==0.2.3
kernels==0.19.1
bitsandbytes==0.50.2
torchao==0.18.0
optimum-quanto==0.2.7
gguf==0.19.0
nvidia-modelopt==0.47.0
ray==2.60.0
prometheus-client==0.26.0
pydantic==2.14.4
pydantic-core==2.50.5
pyyaml==6.0.4
tqdm==4.70.1
pillow==13.0.0
torchmetrics==1.9.0
lightning-utilities==0.15.3
matplotlib==3.11.2
contourpy==1.3.3
cycler==0.12.1
fonttools==4.69.1
kiwisolver==1.5.1
pyparsing==3.3.3
python-dateutil==4.0.0
six==1.17.0
scikit-learn==1.9.1
scipy==1.17.1
psutil==7.2.2
platformdirs==4.14.8
packaging==26.3
huggingface-hub==2.4.0
# the serving stack under Ray Serve
fastapi==0.165.0
starlette==1.10.0
uvicorn==0.54.0
aiohttp==3.14.5
grpcio==1.85.3
protobuf==7.36.2
requests==2.34.2
EOF

WORKDIR /src
COPY pyproject.toml README.md ./
COPY quantserve ./quantserve
# a non-editable install: the package (with the embedded digits model's weights) lands in the venv, /src is left behind
RUN pip install --no-build-isolation -c /opt/constraints-image.txt . \
    && pip check \
    && python -c "import quantserve.serve.rayservice, ray; assert ray.__version__ == '2.60.0', ray.__version__"

# --- runtime ------------------------------------------------------------------------------------------------------
FROM ${CUDA_BASE}
ARG DEBIAN_FRONTEND=noninteractive
# python3.12-dev and gcc: Triton compiles its launcher stub against Python.h at first use of a GPU kernel, and
# quantserve's CPU kernels (quantserve/kernels/csrc) are compiled for the node's processor at first use on a CPU replica
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-dev gcc libc6-dev bash wget ca-certificates procps \
    && rm -rf /var/lib/apt/lists/* \
    && (userdel --remove ubuntu 2>/dev/null || true) \
    && useradd --uid 1000 --user-group --create-home --shell /bin/bash ray \
    && install -d -o 1000 -g 1000 /var/cache/quantserve /models
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/constraints-image.txt /opt/constraints-image.txt

# Triton's cache, filled at build time for the GPU targets the chart's GPU nodes have (no GPU needed here:
# quantserve.kernels.prefill compiles through Triton's own launcher for each named target), so a new GPU replica
# starts without compiling its kernels (benchmarks/RESULTS.md: the compile time that saves). Each format x target
# takes about 16 MB; name the formats your variants serve (python -m quantserve.kernels.aot --help lists them).
ARG TRITON_PREFILL_TARGETS=sm_80,sm_89,sm_90
ARG TRITON_PREFILL_FORMATS=nf4
ENV TRITON_CACHE_DIR=/var/cache/triton
RUN install -d -o 1000 -g 1000 /var/cache/triton \
    && if [ -n "$TRITON_PREFILL_FORMATS" ]; then \
         /opt/venv/bin/python -m quantserve.kernels.prefill --targets "$TRITON_PREFILL_TARGETS" \
           --formats "$TRITON_PREFILL_FORMATS" --jobs "$(nproc)" --no-progress; \
       fi \
    && chown -R 1000:1000 /var/cache/triton

LABEL org.opencontainers.image.title="quantserve" \
      org.opencontainers.image.description="Quantized diffusion models on Ray Serve: A/B router, autoscaling, Prometheus metrics" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/ray \
    PYTHONUNBUFFERED=1 \
    QUANTSERVE_CACHE_DIR=/var/cache/quantserve
USER 1000:1000
WORKDIR /home/ray
# Serve HTTP, Ray's metrics agent, and (on a Ray head) the dashboard, GCS and client ports
EXPOSE 8000 8080 8265 6379 10001
CMD ["quantserve", "serve", "--host", "0.0.0.0", "--metrics-port", "8080"]
