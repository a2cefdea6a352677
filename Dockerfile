# TensorTrim: API, worker and beat from one image.
#   docker build -t tensortrim .                                   (CPU torch)
#   docker build -t tensortrim:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TENSORTRIM_DATA_DIR=/data

WORKDIR /app

# torch first and pinned, from the chosen index, so the project's own install cannot pull another build.
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

COPY pyproject.toml README.md ./
COPY compression ./compression
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
RUN pip install . \
    && python -c "import torch; assert torch.__version__.startswith('${TORCH_VERSION}'), torch.__version__"

# The code and interpreter stay world-readable: the sandboxed child may run with no privileges.
RUN mkdir -p /data && chmod 0755 /app

VOLUME ["/data"]
EXPOSE 8000

# Workers run as root inside the container so the supervisor can give each job's child
# process its own network and mount namespaces and drop every capability (see worker/sandbox.py).
CMD ["python", "-m", "app.cli", "serve", "--host", "0.0.0.0", "--port", "8000"]
