# GPU serving image: vLLM is the engine, this service is the gateway in front of it (keys, limits, audit, metrics,
# SageMaker protocol). vLLM's own image brings its pinned CUDA / torch / transformers stack; the gateway gets a
# separate virtualenv with our pins, so neither stack can break the other.
#
# Modes (see docs/serving.md):
#   serve                                  SageMaker: vLLM child on 127.0.0.1:8000, gateway on 8080, model /opt/ml/model
#   --model s3://b/p --api-keys-file F     same, model downloaded from S3 first
#   --upstream http://127.0.0.1:8000 ...   gateway only, vLLM runs as a sidecar container (the EKS layout)
#   --engine builtin --device cuda ...     the built-in engine on a small GPU, using vLLM's torch (no vLLM process)
#
# Pin the base by digest in CI (`docker buildx imagetools inspect vllm/vllm-openai:v0.33.0`).
FROM vllm/vllm-openai:v0.33.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/serving \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    SERVING_PORT=8080 \
    SERVING_ENGINE=vllm \
    SERVING_MODEL_CACHE_DIR=/home/serving/models

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN groupadd --system --gid 10001 serving \
    && useradd --system --uid 10001 --gid serving --home-dir /home/serving --create-home serving

WORKDIR /app
COPY serving/requirements-gateway.txt /app/serving/requirements-gateway.txt
# --system-site-packages: the built-in engine mode can use vLLM's CUDA torch; the gateway's pins win inside the venv
RUN python3 -m venv --system-site-packages /opt/gateway \
    && /opt/gateway/bin/pip install --no-cache-dir -r /app/serving/requirements-gateway.txt

COPY facts/ /app/facts/
COPY serving/ /app/serving/

USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=900s --retries=3 \
    CMD ["/opt/gateway/bin/python", "-m", "serving.healthcheck"]

ENTRYPOINT ["/opt/gateway/bin/python", "-m", "serving"]
CMD ["serve"]
