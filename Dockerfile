# onnxserve: a KServe v2 gRPC server for ONNX models.
#
# GPU-capable: `pip install '.[cuda]'`, as a user installs it: onnxruntime-gpu plus the CUDA 13 and
# cuDNN 9 libraries it needs, from NVIDIA's pip wheels, which the server preloads at start (no
# LD_LIBRARY_PATH). Without a visible GPU it runs on onnxruntime's CPU provider and says so in its
# log and in the onnxserve_model_ready{provider=...} metric.
#
# Behind a TLS-intercepting proxy, give the build the proxy's CA bundle as a BuildKit secret
# (nothing is written into the image):
#   DOCKER_BUILDKIT=1 docker build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt -t onnxserve .

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
# TensorRT's libraries are about 3 GB, so the default image leaves them out and a model that asks
# for the tensorrt accelerator runs on CUDA, with a warning naming the missing libnvinfer. For an
# image with TensorRT (tag it apart; PyPI's tensorrt-cu13-libs is a stub that fetches the real wheel
# from NVIDIA's index):
#   --build-arg EXTRA_WHEELS="tensorrt-cu13-libs~=10.0" --build-arg PIP_EXTRA_INDEX_URL=https://pypi.nvidia.com
ARG EXTRA_WHEELS=""
ARG PIP_EXTRA_INDEX_URL
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/onnxserve
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server/ server/
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && /opt/onnxserve/bin/pip install '.[cuda]' ${EXTRA_WHEELS}

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 onnxserve \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin onnxserve
COPY --from=build /opt/onnxserve /opt/onnxserve
COPY models/ /opt/onnxserve/models/
ENV PATH=/opt/onnxserve/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ONNXSERVE_MODEL_REPOSITORY=/opt/onnxserve/models
# Mount your own repository here and set ONNXSERVE_MODEL_REPOSITORY=/models.
VOLUME ["/models"]
EXPOSE 8000 8001 8002
USER 10001:10001
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 CMD ["onnxserve-health"]
ENTRYPOINT ["onnxserve"]
