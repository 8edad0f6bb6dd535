# GPU serving image for the built-in engine: the same server as serving.Dockerfile on the CUDA torch wheel. This is
# what a stack with servingEngine: builtin runs on its GPU pool (dev) and on a GPU SageMaker instance; the CPU image
# cannot (its torch has no CUDA), and the vLLM image would pull vLLM's ~10 GB stack to run a model it never uses.
#
#   docker build -f containers/serving-cuda.Dockerfile -t <serving repository url>:<tag> .
#   docker run --gpus all -p 8080:8080 -v $PWD/model:/opt/ml/model:ro <image> serve          # SageMaker form
#
# No CUDA base image: torch's cu128 wheels carry their CUDA runtime, cuBLAS, cuDNN and NCCL as pip packages, and
# the NVIDIA container runtime mounts the host's driver (EKS's AL2023 NVIDIA AMI, SageMaker's GPU hosts) into any
# image that sets NVIDIA_VISIBLE_DEVICES and NVIDIA_DRIVER_CAPABILITIES, as the nvidia/cuda images do.
# Pin the base by digest in CI (`docker buildx imagetools inspect python:3.11.14-slim-bookworm`).
FROM python:3.11.14-slim-bookworm

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    HOME=/home/serving \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    SERVING_PORT=8080 \
    SERVING_ENGINE=builtin \
    SERVING_DEVICE=cuda \
    SERVING_DTYPE=bfloat16 \
    SERVING_MODEL_CACHE_DIR=/home/serving/models

RUN groupadd --system --gid 10001 serving \
    && useradd --system --uid 10001 --gid serving --home-dir /home/serving --create-home serving

WORKDIR /app
COPY serving/requirements.txt /app/serving/requirements.txt
# The same torch release as the CPU image and the training image (tests check the pins agree), CUDA 12.8 build.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" torch==2.13.0 \
    && pip install --no-cache-dir -r /app/serving/requirements.txt

COPY facts/ /app/facts/
COPY serving/ /app/serving/

USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 CMD ["python", "-m", "serving.healthcheck"]

ENTRYPOINT ["python", "-m", "serving"]
CMD ["serve"]
