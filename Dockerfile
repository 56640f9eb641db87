# syntax=docker/dockerfile:1
# The gateway image. vLLM itself runs from the official vllm/vllm-openai image; this one is only the gateway.
#   docker build -t vlm-gateway .                          # "cpu": proxy + CLIP/FAISS on CPU (torch CPU wheels)
#   docker build --build-arg VARIANT=cuda -t vlm-gateway:cuda .   # CLIP on the GPU (torch CUDA wheels)
#   docker build --build-arg VARIANT=proxy -t vlm-gateway:proxy . # proxy role only: no torch, a fraction of the size
#   --build-arg BASE_IMAGE=...  another Python 3.11 base (the tests build one locally: deploy/image/local-base)
ARG PYTHON_VERSION=3.11
ARG BASE_IMAGE=python:${PYTHON_VERSION}-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG VARIANT=cpu
# The torch wheel index of the cpu/cuda variants ("none": PyPI's own torch, for builders that cannot reach it).
ARG TORCH_INDEX=""
# A CA bundle for pip behind a TLS-intercepting proxy (a path inside the build, e.g. a `podman build -v` mount).
ARG PIP_CERT
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY deploy/constraints.txt deploy/constraints.txt
COPY gateway gateway
# Same install as the README's "Install" section: the package plus the `clip` and `milvus` extras, pinned by the
# constraints file shared with the test stack. Only the torch wheel index differs per variant.
RUN python -m venv /opt/venv \
 && case "$VARIANT" in \
      proxy) extras="" ; index="" ;; \
      cpu)   extras="[clip,milvus]" ; index="${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}" ;; \
      cuda)  extras="[clip,milvus]" ; index="${TORCH_INDEX:-https://download.pytorch.org/whl/cu128}" ;; \
      *) echo "VARIANT must be proxy, cpu or cuda" >&2; exit 1 ;; \
    esac \
 && if [ "$index" = none ]; then index=""; fi \
 && /opt/venv/bin/pip install ${index:+--extra-index-url "$index"} -c deploy/constraints.txt ".${extras}"

FROM ${BASE_IMAGE}
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid gateway --home-dir /var/lib/vlm-gateway --create-home gateway
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/var/lib/vlm-gateway/hf \
    GATEWAY_HOST=0.0.0.0
USER 10001:10001
WORKDIR /var/lib/vlm-gateway
EXPOSE 8080 9090
# The port is GATEWAY_PORT's (set it, rather than --port, when the gateway listens elsewhere than 8080).
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('GATEWAY_PORT', '8080'); sys.exit(urllib.request.urlopen(f'http://127.0.0.1:{port}/health/live', timeout=2).status != 200)"]
ENTRYPOINT ["gateway"]
CMD ["serve"]
