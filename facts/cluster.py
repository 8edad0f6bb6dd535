"""Names and numbers the cluster, its workloads and the tools agree on: node pools and their labels and taints,
extended resources, namespaces, service accounts and ports. The deployed program writes them, the launchers and
images rely on them, and the policy pack checks them."""

from __future__ import annotations

# -- node pools --------------------------------------------------------------------------------------------------
POOL_LABEL = "llm-platform/pool"
"""Node label naming the pool a node belongs to; workloads select pools by it."""
PURPOSE_LABEL = "llm-platform/purpose"
"""Label on GPU nodes and the namespaces of their workloads: `training` or `inference`/`serving`."""
SYSTEM_POOL = "system"
"""The fixed-size, untainted pool for controllers and CoreDNS; never scaled to zero."""
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"}
"""Taint on every GPU node, so only workloads that tolerate it (and ask for GPUs) land there."""
BATCH_POOL = "batch"
"""The CPU pool for batch work (data preparation): scales from zero, and back to zero when idle."""
BATCH_TAINT = {"key": "llm-platform/batch", "value": "true", "effect": "NoSchedule"}
"""Taint on every batch node, so only batch pods (which tolerate it and select the pool) land there: controllers and
stray pods stay on the system pool, and an idle batch node has nothing on it to keep it from scaling down."""

# -- extended resources (advertised by the device-plugin charts) -------------------------------------------------
GPU_RESOURCE = "nvidia.com/gpu"
EFA_RESOURCE = "vpc.amazonaws.com/efa"

# -- namespaces and service accounts -----------------------------------------------------------------------------
TRAINING_NAMESPACE = "llm-training"
SERVING_NAMESPACE = "llm-serving"
MONITORING_NAMESPACE = "monitoring"
KUBE_SYSTEM = "kube-system"
TRAINING_SERVICE_ACCOUNT = "trainer"
SERVING_SERVICE_ACCOUNT = "server"
PREPARE_SERVICE_ACCOUNT = "data-prepare"
"""Service account of data-preparation pods (training namespace): its own Pod Identity role, which reads datasets and
model tokenizers and writes only the datasets bucket's PREPARED_PREFIX."""

# -- data ----------------------------------------------------------------------------------------------------------
PREPARED_PREFIX = "prepared"
"""Prefix of the datasets bucket that prepared (tokenized) datasets live under: `prepared/<name>/manifest.json`."""

# -- ports ---------------------------------------------------------------------------------------------------------
SERVING_PORT = 8080
"""The serving container's HTTP port: the SageMaker container contract's 8080, used on EKS too."""
SERVING_OPS_PORT = 8081
"""The serving container's operations listener (`--ops-port`): /healthz, /readyz and /metrics, with connection slots
of its own, so a flood of client connections on SERVING_PORT cannot fail the kubelet's probes, and the prefix-cache
counters in /metrics are never readable from the client port. Probes and the Prometheus scrape use it; the serving
namespace's network policy admits only the monitoring namespace on it."""
TRAINING_METRICS_PORT = 9400
"""The trainer's Prometheus port (`metrics_port`): the Job sets it and annotates its pods; the training namespace's
network policy admits the monitoring namespace on it."""
DCGM_PORT = 9400
"""dcgm-exporter's metrics port (its chart's `service.port` default), on GPU nodes."""
