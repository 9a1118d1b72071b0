# flowserve: one replica = one process = one device.
#
#   docker build -t flowserve .                                   # CPU (default)
#   docker build -t flowserve:gpu --build-arg TORCH_VARIANT=cu128 .   # CUDA wheels of the same torch
#   docker run -p 8000:8000 flowserve                             # serves the models baked in at /models
#   docker run -p 8000:8000 -v "$PWD/models:/models:ro" flowserve # or a mounted model repository
#
# Configuration is FLOWSERVE_* environment variables (see service/settings.py); SIGTERM drains.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim

# torch first, pinned, from PyTorch's own index: "cpu" keeps the multi-GB CUDA build out of the
# default image; a CUDA variant (e.g. cu128) bundles its CUDA runtime, the host supplies the driver.
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" "torch==${TORCH_VERSION}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
RUN pip install . && rm -rf /app/build

# the default models (a mounted repository replaces them); the server only reads them
COPY models /models

RUN useradd --create-home --uid 10001 --user-group flowserve
# numeric, so that Kubernetes' runAsNonRoot can verify it (a user name cannot be checked)
USER 10001:10001

ENV FLOWSERVE_HOST=0.0.0.0 \
    FLOWSERVE_PORT=8000 \
    FLOWSERVE_MODEL_DIR=/models \
    FLOWSERVE_DEVICE=auto
EXPOSE 8000

# ready = every model loaded and the device worker running (503 while loading and while draining)
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["flowserve", "serve"]
