# syntax=docker/dockerfile:1
# The zimage-orchestrator service image: `zimage-orch serve` on 0.0.0.0:8000 as a non-root user, the model cache on
# the /models volume. docs/container.md has the build and run commands; the two variants differ in two build args:
#
#   GPU (default)  BASE_IMAGE=nvidia/cuda:13.0.3-base-ubuntu24.04, torch==2.13.0 from PyPI, whose Linux wheels
#                  bring CUDA 13.0 and cuDNN as pip packages (so the CUDA base only adds the driver check and
#                  compat libraries; no second copy of the CUDA libraries in the image). Hosts need an NVIDIA driver
#                  for CUDA 13.0 (580 or newer) and the NVIDIA Container Toolkit.
#   CPU            --build-arg BASE_IMAGE=ubuntu:24.04 --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu
#
# Linted with hadolint (tests/test_container.py). Not built where this project is developed: those machines have no
# container engine.

ARG BASE_IMAGE=nvidia/cuda:13.0.3-base-ubuntu24.04

# ---- build: a virtual environment with torch, the dependencies and the project ----------------------------------
FROM ${BASE_IMAGE} AS build
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX=
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
# torch first and pinned (as tasks.py does), so the project's `torch>=` requirement is already met and pip does not
# reach for another build. (The pin is in TORCH_SPEC, which hadolint cannot see.)
# hadolint ignore=DL3013
RUN if [[ -n "$TORCH_INDEX" ]]; then pip install --index-url "$TORCH_INDEX" "$TORCH_SPEC"; \
    else pip install "$TORCH_SPEC"; fi
WORKDIR /src
COPY pyproject.toml README.md ./
# The dependencies alone, in a layer that is reused until pyproject.toml changes; then the project itself. pip writes
# every package's bytecode (.pyc) as it installs: keep it that way (no --no-compile, no PYTHONDONTWRITEBYTECODE
# here), or every replica start compiles torch's and diffusers' sources again (7-11 s more per start on an H100 host;
# docs/benchmarks.md, session 11).
# The s3 extra too (boto3): `response_format: url` and batch outputs on an S3-compatible store. Not the bench extra
# (matplotlib): the server never imports the benchmark tooling.
RUN python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['s3']))" \
      > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt
COPY zimage_common ./zimage_common
COPY orchestrator ./orchestrator
COPY placement ./placement
COPY actors ./actors
RUN pip install --no-deps . \
 && zimage-orch --help > /dev/null

# ---- runtime ------------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 zimage \
 && useradd --create-home --uid 10001 --gid 10001 --shell /bin/bash zimage \
 && mkdir -p /models /etc/zimage \
 && chown zimage:zimage /models
COPY --from=build /opt/venv /opt/venv
COPY clusters /opt/zimage/clusters
COPY docker/zimage-ray-node /usr/local/bin/zimage-ray-node
# Every model cache under /models: the tiny demo model, Hugging Face, ModelScope. Ray's colour codes off (log files).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    ZIMAGE_CACHE=/models/zimage \
    HF_HOME=/models/huggingface \
    MODELSCOPE_CACHE=/models/modelscope \
    RAY_COLOR_PREFIX=0
VOLUME ["/models"]
# A numeric user, so that Kubernetes can check runAsNonRoot.
USER 10001:10001
WORKDIR /home/zimage
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]
# 0.0.0.0 inside the container: the API is reachable only through the ports the operator publishes (`-p 8000:8000`,
# a Kubernetes Service), and publishing them is that operator's explicit choice. Set API keys (ZIMAGE_API_KEYS or
# server.api_keys) whenever the port is reachable by anyone else; the server logs a warning when it has none.
# Arguments after the image name are the config file and options: `... zimage-orch:gpu /etc/zimage/config.yaml`.
ENTRYPOINT ["zimage-orch", "serve", "--host", "0.0.0.0", "--port", "8000"]
