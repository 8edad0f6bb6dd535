# syntax=docker/dockerfile:1.7
# Training image: torchrun-native trainer (python -m training) for the EKS training pool and SageMaker.
#   docker build -f containers/training.Dockerfile -t <training_repository_url>:<tag> .
# The CUDA runtime comes from the base image; torch's CUDA wheels bring their own cuDNN and NCCL builds,
# pinned to the same versions as the CPU stack in requirements.txt (tests check that the pins agree).
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

ARG PYTHON=python3.11
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# EFA: libfabric + aws-ofi-nccl let NCCL use the Elastic Fabric Adapter between nodes (p4d/p5/g6e.12xlarge+).
# Without it NCCL falls back to TCP sockets: correct, much slower across nodes.
ARG INSTALL_EFA=true
# A release that exists: AWS's own container templates pin it (aws-samples/awsome-distributed-training,
# micro-benchmarks/expert-parallelism/deepep-benchmark/deepep.Dockerfile). 1.43.1 was never confirmed.
ARG EFA_INSTALLER_VERSION=1.48.0

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/opt/amazon/efa/bin:$PATH \
    LD_LIBRARY_PATH=/opt/amazon/efa/lib:/opt/amazon/ofi-nccl/lib/x86_64-linux-gnu:$LD_LIBRARY_PATH \
    TRAINING_LOCAL_DIR=/scratch \
    HF_HUB_OFFLINE=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# DL3008: the CUDA base image pins the distribution; apt versions float within it.
# DL3003: the EFA installer must run from its own directory.
# gcc, libc6-dev and the Python headers: `model.compile=true` is supported, and Triton (torch.compile's GPU backend)
# builds its CUDA launcher stub with the system C compiler against Python.h at the first compiled step; the CUDA
# runtime base has neither, so that step would fail (pytorch/pytorch#116696). Whether compile pays on a GPU is not
# measured yet: bench/gpu_check.sh times eager against compiled; if compiled does not win there, drop the option and
# these packages together.
# hadolint ignore=DL3008,DL3003
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ${PYTHON} ${PYTHON}-venv ${PYTHON}-dev gcc libc6-dev ca-certificates curl \
    && if [ "${INSTALL_EFA}" = "true" ]; then \
        curl -fsSL "https://efa-installer.amazonaws.com/aws-efa-installer-${EFA_INSTALLER_VERSION}.tar.gz" \
            | tar -xz -C /tmp \
        && (cd /tmp/aws-efa-installer && ./efa_installer.sh -y --skip-kmod --skip-limit-conf --no-verify) \
        && rm -rf /tmp/aws-efa-installer; \
    fi \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*

RUN ${PYTHON} -m venv "${VIRTUAL_ENV}" \
    && pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0 \
    && pip install \
        transformers==5.23.0 \
        tokenizers==0.23.3 \
        safetensors==0.8.0 \
        boto3==1.44.5 \
        PyYAML==6.0.3 \
        prometheus-client==0.26.0

# Non-root at run time. SageMaker mounts /opt/ml/* over these directories; creating them owned by the
# trainer keeps them writable when it does not.
RUN useradd --create-home --uid 1000 --user-group trainer \
    && mkdir -p /app /scratch /opt/ml/model /opt/ml/checkpoints /opt/ml/output \
    && chown -R trainer:trainer /app /scratch /opt/ml \
    && printf '#!/bin/sh\n# SageMaker training-container entry point: docker run <image> train\nexec python -m training.sagemaker_entry "$@"\n' \
        > /usr/local/bin/train \
    && chmod 0755 /usr/local/bin/train

WORKDIR /app
COPY --chown=trainer:trainer facts/ /app/facts/
COPY --chown=trainer:trainer training/ /app/training/
# Numeric, so that Kubernetes can verify runAsNonRoot without resolving names.
USER 1000:1000

# EKS runs `python -m training.torchrun ... -m training` (the Job's command); SageMaker runs `train`.
# 29500: torchrun rendezvous; 9400: the trainer's Prometheus metrics (metrics_port, set by the EKS Job).
EXPOSE 29500 9400
CMD ["train"]
