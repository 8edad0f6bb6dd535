# CPU serving image: the built-in batching engine (or the gateway, with --upstream) on the CPU torch wheel.
#
#   docker build -f containers/serving.Dockerfile -t llm-serving:cpu .
#   docker run -p 8080:8080 -v $PWD/model:/opt/ml/model:ro llm-serving:cpu serve          # SageMaker form
#   docker run -p 8080:8080 llm-serving:cpu --model s3://bucket/prefix --api-keys-file /keys   # EKS form
#
# Pin the base by digest in CI (`docker buildx imagetools inspect python:3.11.14-slim-bookworm`); the tag below is
# an exact patch release so rebuilds do not drift across Python versions.
FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    HOME=/home/serving \
    SERVING_PORT=8080 \
    SERVING_MODEL_CACHE_DIR=/home/serving/models

RUN groupadd --system --gid 10001 serving \
    && useradd --system --uid 10001 --gid serving --home-dir /home/serving --create-home serving

WORKDIR /app
COPY serving/requirements.txt /app/serving/requirements.txt
# torch from the CPU index only (the default PyPI wheel bundles CUDA libraries this image never uses)
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && pip install --no-cache-dir -r /app/serving/requirements.txt

COPY facts/ /app/facts/
COPY serving/ /app/serving/

USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 CMD ["python", "-m", "serving.healthcheck"]

# SageMaker runs `docker run <image> serve`: `serve` arrives as the first argument and is understood as such.
# Kubernetes passes flags as args. Configuration also comes from SERVING_* environment variables.
ENTRYPOINT ["python", "-m", "serving"]
CMD ["serve"]
