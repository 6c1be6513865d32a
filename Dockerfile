# syntax=docker/dockerfile:1.7
# supmae-serve: the REST API (and, on request, the Gradio demo) with the model baked in.
#
#   docker build -t supmae-serve .                                  # GPU image (CUDA runtime base)
#   docker build -t supmae-serve:cpu --build-arg DEVICE=cpu .       # CPU image (plain Ubuntu base)
#   docker run --gpus all -p 8000:8000 -e SUPMAE_API_KEYS=k1,k2 supmae-serve   # http://localhost:8000/docs
#   docker run -p 8000:8000 -e SUPMAE_DEMO=true supmae-serve:cpu   # + the demo at /demo (no API keys)
#
# The container listens on 0.0.0.0, so the demo is off unless SUPMAE_DEMO=true (a public demo is opt-in,
# and it is never mounted when API keys are set); see docs/deployment.md, "Security", for what a
# deployment adds in front (TLS, a reverse proxy's timeouts and body limits, keys).
#
# Another model: --build-arg MODEL=<folder in the build context> (a checkpoint folder or a supmae-export
# folder). Every setting is an environment variable (SUPMAE_*) or a flag after the image name.
# Not built on the development machines (no Docker engine there): see docs/deployment notes in README.

ARG DEVICE=cuda
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG CPU_IMAGE=ubuntu:24.04

FROM ${CUDA_IMAGE} AS base-cuda
FROM ${CPU_IMAGE} AS base-cpu

# hadolint global ignore=DL3008,DL3013
# (apt and pip versions: Ubuntu's python3 follows the base image; torch is pinned through TORCH_PINS and the
# package's own dependencies through pyproject.toml)

# ---------------------------------------------------------------------------- build: /opt/venv
# DL3006 (untagged image): base-${DEVICE} is one of the two stages above, whose images are tagged
# (CUDA_IMAGE, CPU_IMAGE); hadolint cannot see through the variable
# hadolint ignore=DL3006
FROM base-${DEVICE} AS build
ARG DEVICE
# the torch/torchvision pair of the Makefile; the wheel index decides the CUDA build (or the CPU-only one)
ARG TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
ARG TORCH_INDEX_CUDA=https://download.pytorch.org/whl/cu128
ARG TORCH_INDEX_CPU=https://download.pytorch.org/whl/cpu
# demo: gradio; features: faiss-cpu + pyarrow, so /v1/search serves the shipped gallery as `make serve` does
ARG EXTRAS=demo,features
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN if [ "$DEVICE" = "cpu" ]; then index="$TORCH_INDEX_CPU"; else index="$TORCH_INDEX_CUDA"; fi \
    && pip install --index-url "$index" $TORCH_PINS
WORKDIR /src
COPY pyproject.toml README.md ./
COPY supmae_serve ./supmae_serve
COPY app ./app
COPY export ./export
COPY training ./training
# onnxruntime-gpu replaces onnxruntime on the GPU image (both install the same module)
RUN pip install ".[${EXTRAS}]" $TORCH_PINS \
    && if [ "$DEVICE" != "cpu" ]; then pip uninstall -y onnxruntime && pip install "onnxruntime-gpu>=1.18"; fi

# ---------------------------------------------------------------------------- runtime
# (DL3006 as above: a tagged stage chosen by DEVICE)
# hadolint ignore=DL3006
FROM base-${DEVICE} AS runtime
ARG MODEL=supmae_serve/assets/cifar10_vit_tiny
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 supmae \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin supmae
COPY --from=build /opt/venv /opt/venv
COPY ${MODEL} /opt/supmae/model
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/home/supmae \
    XDG_CACHE_HOME=/home/supmae/.cache \
    SUPMAE_MODEL=/opt/supmae/model \
    SUPMAE_HOST=0.0.0.0 \
    SUPMAE_PORT=8000
USER 10001:10001
WORKDIR /home/supmae
# fail the build, not the deployment, when the baked model does not load; on the way it builds the model's
# ONNX Runtime graph into the graph cache ($XDG_CACHE_HOME/supmae/graphs), so containers start without building
RUN supmae-serve --check --device cpu --no-warmup --no-demo > /dev/null
EXPOSE 8000
# ready = model loaded, warmed up, batching worker alive (urlopen raises on 503 or no answer: exit 1)
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('SUPMAE_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["supmae-serve"]
CMD []
