# syntax=docker/dockerfile:1
# The gateway image. vLLM itself runs from the official vllm/vllm-openai image; this one is only the gateway.
#   docker build -t vlm-gateway .                          # "cpu": proxy + CLIP/FAISS on CPU (torch CPU wheels)
#   docker build --build-arg VARIANT=cuda -t vlm-gateway:cuda .   # CLIP on the GPU (torch CUDA wheels)
#   docker build --build-arg VARIANT=proxy -t vlm-gateway:proxy . # proxy role only: no torch, a fraction of the size
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ARG VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY deploy/constraints.txt deploy/constraints.txt
COPY gateway gateway
# Same install as the README's "Install" section: the package plus the `clip` extra, pinned by the constraints
# file shared with the test stack. Only the torch wheel index differs per variant.
RUN python -m venv /opt/venv \
 && case "$VARIANT" in \
      proxy) extras="" ; index="" ;; \
      cpu)   extras="[clip]" ; index="https://download.pytorch.org/whl/cpu" ;; \
      cuda)  extras="[clip]" ; index="https://download.pytorch.org/whl/cu128" ;; \
      *) echo "VARIANT must be proxy, cpu or cuda" >&2; exit 1 ;; \
    esac \
 && /opt/venv/bin/pip install ${index:+--extra-index-url "$index"} -c deploy/constraints.txt ".${extras}"

FROM python:${PYTHON_VERSION}-slim-bookworm
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
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/health/live', timeout=2).status != 200)"]
ENTRYPOINT ["gateway"]
CMD ["serve"]
