"""Observability under the mock engine, per stack: DCGM exporter on every GPU pool, Prometheus (in-cluster or Amazon
Managed Prometheus) scraping GPUs, serving and training, the Grafana dashboard whose every query names a metric our
exporters and containers really emit, and the alarms (SageMaker endpoint, node launch failures) on an encrypted
topic."""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pulumi_aws as aws
import pulumi_kubernetes as k8s
import pytest
import yaml

from facts import pulumi_types as tok
from facts.tags import stack_tags
from infra.charts import CHART_TYPE, CHARTS
from infra.config import StackConfig
from infra.config import load_stack as config
from infra.observability import (
    AMP_COLLECTOR_USER,
    ClusterMonitoring,
    ClusterMonitoringArgs,
    Observability,
    ObservabilityArgs,
)
from infra.prometheus import (
    DCGM_COUNTERS,
    PROMETHEUS_CHART_DEFAULT_JOBS,
    dashboard_files,
    dcgm_exporter_values,
    monitoring_namespace,
    scrape_config,
)
from ops.mocks import Recorded, RecordingMocks, Run, run_program
from tests.helpers import REPO_ROOT as REPO
from tests.helpers import STACK_OUTPUTS_DEV
from tests.infra.scheduling import can_schedule

STACKS = ("dev", "staging", "prod")
ACCOUNT = "123456789012"
ENDPOINT = "llmp-endpoint"
TOPIC = tok.SNS_TOPIC
ALARM = tok.CLOUDWATCH_METRIC_ALARM


SERVING = {"llm-platform:servingImageTag": "0.1.0"}
"""dev with its serving image pushed (shipped, it is in its first-run shape: no serving declared)."""


def run_observability(cfg: StackConfig) -> Run:
    def program() -> dict[str, Any]:
        provider = k8s.Provider("k8s", kubeconfig="{}")
        groups = {
            pool: aws.eks.NodeGroup(
                f"ng-{pool}",
                cluster_name=cfg.name_prefix,
                node_group_name=f"{cfg.name_prefix}-{pool}",
                node_role_arn=f"arn:aws:iam::{ACCOUNT}:role/node",
                subnet_ids=["subnet-a", "subnet-b"],
                scaling_config=aws.eks.NodeGroupScalingConfigArgs(min_size=0, max_size=2, desired_size=0),
            )
            for pool in ("system", *(p.name for p in cfg.cluster.gpu_pools))
        }
        obs = Observability(
            "observability",
            ObservabilityArgs(
                observability=cfg.observability,
                serving=cfg.serving,
                stack=cfg.stack,
                name_prefix=cfg.name_prefix,
                protect_data=cfg.storage.protect_data,
                cluster_arn=f"arn:aws:eks:{cfg.region}:{ACCOUNT}:cluster/{cfg.name_prefix}",
                cluster_security_group_id="sg-cluster",
                private_subnet_ids=["subnet-a", "subnet-b"],
                node_groups=groups,
                account_id=ACCOUNT,
                partition="aws",
                tags=stack_tags(cfg.stack, cfg.environment),
                sagemaker_endpoint_name=ENDPOINT if cfg.serving.on_sagemaker else None,
            ),
        )
        # The in-cluster half is the cluster layer's (infra/layers.py); declared here too, as the environment has both.
        monitoring = ClusterMonitoring(
            "observability",
            ClusterMonitoringArgs(
                observability=cfg.observability,
                gpu_pools=cfg.cluster.gpu_pools,
                stack=cfg.stack,
                provider=provider,
                amp_query_url=obs.amp_query_url,
            ),
        )
        return {"topic": obs.alert_topic_arn, "prometheus": monitoring.prometheus_url, "amp": obs.amp_workspace_id}

    return run_program(program, {}, cfg.stack, cfg.project, cfg.region, mocks=RecordingMocks(cfg.region))


_runs: dict[str, tuple[StackConfig, Run]] = {}


@pytest.fixture(params=STACKS)
def stack(request: pytest.FixtureRequest) -> tuple[StackConfig, Run]:
    if request.param not in _runs:
        cfg = config(request.param)
        _runs[request.param] = (cfg, run_observability(cfg))
    return _runs[request.param]


def k8s_objects(run: Run) -> list[dict[str, Any]]:
    """Our own Kubernetes objects (the charts' are rendered by the provider at deploy time)."""
    return [r.inputs for r in run.resources if r.type.startswith("kubernetes:") and r.type != CHART_TYPE]


def charts(run: Run) -> dict[str, Recorded]:
    return {r.inputs["name"]: r for r in run.of_type(CHART_TYPE)}


def assert_pinned(rec: Recorded, key: str) -> None:
    pinned = CHARTS[key]
    assert (rec.inputs["chart"], rec.inputs["version"]) == (pinned.chart, pinned.version)
    assert rec.inputs["repositoryOpts"] == {"repo": pinned.repository}
    assert rec.inputs["namespace"] == "monitoring"
    assert "kubernetes:core/v1:Namespace::observability-namespace" in rec.depends_on


# -- metrics pipeline ----------------------------------------------------------------------------------------------


def test_metrics_backend_follows_config(stack: tuple[StackConfig, Run]) -> None:
    cfg, run = stack
    mode = cfg.observability.metrics
    prometheus = charts(run).get("prometheus")
    assert bool(prometheus) is (mode == "in-cluster")
    assert bool(run.of_type(tok.AMP_WORKSPACE)) is (mode == "amp")
    if prometheus is not None:
        assert_pinned(prometheus, "prometheus")
        assert run.outputs["prometheus"] == "http://prometheus.monitoring.svc:9090"
        values = prometheus.inputs["values"]
        server = values["server"]
        # The Service the URL names: the chart's server fullname and service port.
        assert server["fullnameOverride"] == "prometheus" and server["service"] == {"servicePort": 9090}
        assert server["nodeSelector"] == {"llm-platform/pool": "system"}
        assert server["image"] == {"tag": f"v{cfg.observability.prometheus_version}"}
        assert server["retention"] == f"{cfg.observability.prometheus_retention_days}d"
        assert server["persistentVolume"] == {"enabled": False}
        # prometheus.yml = server.global + our scrape jobs; every default job of the chart switched off.
        expected = scrape_config(cfg.stack)
        assert server["global"] == expected["global"]
        assert values["serverFiles"]["prometheus.yml"]["scrape_configs"] == expected["scrape_configs"]
        assert values["scrapeConfigs"] == {job: {"enabled": False} for job in PROMETHEUS_CHART_DEFAULT_JOBS}
        for sub in ("alertmanager", "kube-state-metrics", "prometheus-node-exporter", "prometheus-pushgateway"):
            assert values[sub] == {"enabled": False}
    if mode == "amp":
        scraper = run.one(tok.AMP_SCRAPER).inputs
        assert scraper["source"]["eks"] == {
            "clusterArn": f"arn:aws:eks:{cfg.region}:{ACCOUNT}:cluster/{cfg.name_prefix}",
            "subnetIds": ["subnet-a", "subnet-b"],
            "securityGroupIds": ["sg-cluster"],
        }
        assert scraper["destination"]["amp"]["workspaceArn"].startswith(
            f"arn:aws:aps:{cfg.region}:{ACCOUNT}:workspace/"
        )
        assert yaml.safe_load(scraper["scrapeConfiguration"]) == scrape_config(cfg.stack, managed_collector=True)
        # AMP creates the scraper role's access entry itself on API-auth clusters; a second one fails (ResourceInUse).
        assert run.of_type(tok.EKS_ACCESS_ENTRY) == []
        (binding,) = [o for o in k8s_objects(run) if o["kind"] == "ClusterRoleBinding"]
        assert binding["subjects"] == [
            {"kind": "User", "name": AMP_COLLECTOR_USER, "apiGroup": "rbac.authorization.k8s.io"}
        ]
        assert run.outputs["prometheus"].startswith(f"https://aps-workspaces.{cfg.region}.amazonaws.com/workspaces/")


def test_scrape_jobs_cover_gpus_serving_and_training() -> None:
    jobs = {j["job_name"]: j for j in scrape_config(config("dev").stack)["scrape_configs"]}
    assert set(jobs) == {"dcgm", "serving", "training"}
    assert jobs["serving"]["kubernetes_sd_configs"][0]["namespaces"]["names"] == ["llm-serving"]
    assert jobs["training"]["kubernetes_sd_configs"][0]["namespaces"]["names"] == ["llm-training"]
    # The address rewrite Prometheus applies (anchored RE2 regex, "$1:$2" replacement) lands on the annotated port.
    rewrite = jobs["serving"]["relabel_configs"][2]
    regex = re.compile(f"^(?:{rewrite['regex']})$")
    for address in ("10.0.1.7:8080;9100", "10.0.1.7;9100"):
        match = regex.match(address)
        assert match is not None and f"{match[1]}:{match[2]}" == "10.0.1.7:9100"


def test_training_pods_are_annotated_for_the_training_job() -> None:
    from ops.stack_outputs import load_outputs
    from ops.training_k8s_job import TrainingJobSpec, render_training_job

    outputs = load_outputs("dev", str(STACK_OUTPUTS_DEV))
    _, job = render_training_job(TrainingJobSpec(name="run1", data="d"), outputs)
    template = job["spec"]["template"]
    assert job["metadata"]["namespace"] == "llm-training"
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    (container,) = template["spec"]["containers"]
    port = int(annotations["prometheus.io/port"])
    assert {"name": "metrics", "containerPort": port, "protocol": "TCP"} in container["ports"]
    assert f"metrics_port={port}" in container["command"]


def test_serving_pods_are_annotated_for_the_serving_job(run_stack: Callable[..., Run]) -> None:
    dep = run_stack("dev", SERVING).one(tok.K8S_DEPLOYMENT, "serving-eks-deployment")
    template = dep.inputs["spec"]["template"]
    assert dep.inputs["metadata"]["namespace"] == "llm-serving"
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    ports = {p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
    assert int(annotations["prometheus.io/port"]) in ports


def test_serving_network_policy_admits_the_in_cluster_prometheus(run_stack: Callable[..., Run]) -> None:
    """kubernetes_base's default-deny in llm-serving admits the metrics (operations) port only from the scrapers'
    namespace: /metrics is not on the client port 8080."""
    run = run_stack("dev", SERVING)
    (policy,) = [
        r.inputs
        for r in run.of_type(tok.K8S_NETWORK_POLICY)
        if r.inputs["metadata"]["name"] == "allow-metrics-ingress"
        and r.inputs["metadata"]["namespace"] == "llm-serving"
    ]
    (rule,) = policy["spec"]["ingress"]
    selectors = [s["namespaceSelector"]["matchLabels"] for s in rule["from"] if "namespaceSelector" in s]
    labels = monitoring_namespace()["metadata"]["labels"]
    assert any(all(labels.get(k) == v for k, v in sel.items()) for sel in selectors)
    dep = run.one(tok.K8S_DEPLOYMENT, "serving-eks-deployment")
    port = int(dep.inputs["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"])
    assert {"protocol": "TCP", "port": port} in rule["ports"]


def test_dcgm_exporter_runs_on_every_gpu_pool_and_nowhere_else(stack: tuple[StackConfig, Run]) -> None:
    cfg, run = stack
    dcgm = charts(run).get("dcgm-exporter")
    if cfg.observability.metrics == "none":
        assert dcgm is None
        return
    assert dcgm is not None
    assert_pinned(dcgm, "dcgm-exporter")
    values = dcgm.inputs["values"]
    assert values == dcgm_exporter_values(cfg.observability, cfg.cluster.gpu_pools)
    assert values["image"] == {"tag": cfg.observability.dcgm_exporter_version}
    # The chart's pods carry app.kubernetes.io/name=<chart name> and serve on service.port: what the dcgm job keeps.
    assert values["fullnameOverride"] == "dcgm-exporter" and values["service"] == {"port": 9400}
    (job,) = [j for j in scrape_config(cfg.stack)["scrape_configs"] if j["job_name"] == "dcgm"]
    assert [r["regex"] for r in job["relabel_configs"][:2]] == ["dcgm-exporter", "9400"]
    assert values["serviceMonitor"] == {"enabled": False}
    assert values["securityContext"]["capabilities"] == {"add": [], "drop": ["ALL"]}
    pod = {"affinity": values["affinity"], "tolerations": values["tolerations"], "containers": [{"name": "x"}]}
    for pool in cfg.cluster.gpu_pools:
        assert can_schedule(pod, [pool]) == (True, pool.name)
    system = {
        "name": "system",
        "instance_types": ["g6.xlarge"],
        "max_size": 2,
        "labels": {"llm-platform/pool": "system"},
    }
    assert not can_schedule(pod, [system])[0]
    assert [line.split(",")[0] for line in values["customMetrics"].splitlines()] == [c[0] for c in DCGM_COUNTERS]


def test_metrics_none_runs_nothing_in_the_cluster() -> None:
    cfg = config("dev", metrics="none")
    run = run_observability(cfg)
    assert not k8s_objects(run) and not run.of_type(CHART_TYPE) and run.outputs["prometheus"] is None
    assert run.of_type(TOPIC)  # alarms don't depend on Prometheus


def test_every_kubernetes_object_is_valid(stack: tuple[StackConfig, Run]) -> None:
    cfg, run = stack
    objects = k8s_objects(run)
    assert objects
    for obj in objects:
        kubernetes_validate.validate(obj, cfg.cluster.kubernetes_version, strict=True)


# -- the dashboard --------------------------------------------------------------------------------------------------

PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
    "inf", "nan",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: identifiers left after removing strings, label matchers, ranges,
    grouping clauses, function calls and keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        rest = text[match.end() :].lstrip()
        if rest.startswith("(") or match[0].lower() in PROMQL_WORDS:
            continue
        names.add(match[0])
    return names


def prometheus_client_names(*paths: Path) -> set[str]:
    """Series names the prometheus_client metrics defined in these files expose (Counter `x` -> `x_total`, ...)."""
    series = {
        "Counter": ("_total", "_created"),
        "Gauge": ("",),
        "Histogram": ("_bucket", "_sum", "_count", "_created"),
        "Summary": ("", "_sum", "_count", "_created"),
        "Info": ("_info",),
    }
    names: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)):
                continue
            kind = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if kind in series and isinstance(node.args[0].value, str):
                base = node.args[0].value.removesuffix("_total") if kind == "Counter" else node.args[0].value
                names.update(base + suffix for suffix in series[kind])
    return names


def serving_metric_names() -> set[str]:
    return prometheus_client_names(*sorted((REPO / "serving").rglob("*.py")))


def training_metric_names() -> set[str]:
    return prometheus_client_names(*sorted((REPO / "training").rglob("*.py")))


def dashboard_queries() -> list[tuple[str, str]]:
    out = []
    for file_name, text in dashboard_files().items():
        for panel in json.loads(text)["panels"]:
            for target in panel["targets"]:
                out.append((f"{file_name}: {panel['title']}", target["expr"]))
    return out


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le) (rate(llm_serving_request_latency_seconds_bucket{endpoint="chat"}[5m])))'
    )
    assert metric_names(expr) == {"llm_serving_request_latency_seconds_bucket"}
    assert metric_names("100 * sum by (gpu) (A) / (sum(B) + sum without (x) (C))") == {"A", "B", "C"}
    assert "llm_serving_made_up_total" not in serving_metric_names()
    assert {"llm_serving_requests_total", "llm_serving_queue_depth", "llm_serving_batch_size_bucket"} <= (
        serving_metric_names()
    )


def test_dashboard_loads_and_every_query_names_an_emitted_metric() -> None:
    files = dashboard_files()
    assert files, "no dashboards in infra/dashboards"
    emitted = serving_metric_names() | training_metric_names() | {name for name, _, _ in DCGM_COUNTERS}
    queries = dashboard_queries()
    for where, expr in queries:
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        unknown = names - emitted
        assert not unknown, f"{where}: {sorted(unknown)} emitted by no exporter or container of ours"
    for text in files.values():
        dash = json.loads(text)
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids)) and dash["uid"]
    used = set().union(*(metric_names(e) for _, e in queries))
    # What the issue asks to watch: GPU utilisation and memory, serving requests, latency, TTFT, queue.
    for required in (
        "DCGM_FI_DEV_GPU_UTIL",
        "DCGM_FI_DEV_FB_USED",
        "llm_serving_requests_total",
        "llm_serving_request_latency_seconds_bucket",
        "llm_serving_time_to_first_token_seconds_bucket",
        "llm_serving_queue_depth",
        "llm_serving_inflight_requests",
    ):
        assert required in used, required
    # Training panels come with the trainer's metrics: once training/ defines any, the dashboard must show them.
    training = training_metric_names()
    assert bool(training & used) is bool(training), f"training emits {sorted(training)}: add its panels"
    # Every series the trainer exposes (bar the counters' `_created` timestamps) has a panel.
    for name in ("llm_training_tokens_per_second", "llm_training_tokens_total", "llm_training_loss",
                 "llm_training_learning_rate", "llm_training_mfu", "llm_training_checkpoints_total",
                 "llm_training_step"):  # fmt: skip
        assert name in training, f"training/ no longer defines {name}"
        assert name in used, name
    assert {n for n in training if not n.endswith("_created")} <= used


def test_dashboards_ship_as_grafana_configmaps(stack: tuple[StackConfig, Run]) -> None:
    cfg, run = stack
    maps = [o for o in k8s_objects(run) if o["kind"] == "ConfigMap" and "grafana_dashboard" in o["metadata"]["labels"]]
    if cfg.observability.metrics == "none":
        assert not maps
        return
    assert {name: text for m in maps for name, text in m["data"].items()} == dashboard_files()
    assert all(m["metadata"]["labels"]["grafana_dashboard"] == "1" for m in maps)


# -- alerting -------------------------------------------------------------------------------------------------------


def test_alert_topic_is_encrypted_and_reaches_people(stack: tuple[StackConfig, Run]) -> None:
    cfg, run = stack
    key = run.one(tok.KMS_KEY)
    topic = run.one(TOPIC).inputs
    assert topic["kmsMasterKeyId"] == key.state["keyId"]
    assert key.inputs["enableKeyRotation"] is True
    assert key.protect is cfg.storage.protect_data  # the production policy protects every key of a protected stack
    key_policy = json.loads(key.inputs["policy"])
    publishers = next(s for s in key_policy["Statement"] if s["Sid"] == "AlarmAndEventPublishers")
    assert publishers["Condition"] == {"StringEquals": {"aws:SourceAccount": ACCOUNT}}
    topic_policy = json.loads(run.one(tok.SNS_TOPIC_POLICY).inputs["policy"])
    services = next(s for s in topic_policy["Statement"] if s["Sid"] == "AlarmsAndRulesOfThisAccount")
    assert services["Action"] == "sns:Publish" and services["Condition"]["StringEquals"]["aws:SourceAccount"] == ACCOUNT
    subs = run.of_type(tok.SNS_TOPIC_SUBSCRIPTION)
    assert sorted(s.inputs["endpoint"] for s in subs) == sorted(cfg.observability.alert_emails)
    assert all(s.inputs["protocol"] == "email" for s in subs)
    tags = stack_tags(cfg.stack, cfg.environment)
    taggable = (tok.KMS_KEY, TOPIC, ALARM, tok.CLOUDWATCH_EVENT_RULE, tok.AMP_WORKSPACE)
    for rec in run.resources:
        if rec.type in taggable or rec.type in (tok.AMP_SCRAPER, tok.EKS_ACCESS_ENTRY):
            assert rec.inputs.get("tags") == tags, rec.name
    assert run.duplicate_names() == []


def test_node_launch_failures_alert(stack: tuple[StackConfig, Run]) -> None:
    cfg, run = stack
    rule = run.one(tok.CLOUDWATCH_EVENT_RULE, "observability-capacity-failures").inputs
    pattern = json.loads(rule["eventPattern"])
    assert pattern["source"] == ["aws.autoscaling"]
    assert pattern["detail-type"] == ["EC2 Instance Launch Unsuccessful"]
    pools = ("system", *(p.name for p in cfg.cluster.gpu_pools))
    assert pattern["detail"]["AutoScalingGroupName"] == sorted(f"eks-{cfg.name_prefix}-{p}-asg" for p in pools)
    target = run.one(tok.CLOUDWATCH_EVENT_TARGET).inputs
    assert target["arn"] == run.outputs["topic"]


def test_sagemaker_alarms_only_where_sagemaker_serves(stack: tuple[StackConfig, Run]) -> None:
    cfg, run = stack
    alarms = {r.inputs["name"].removeprefix(f"{cfg.name_prefix}-sagemaker-"): r.inputs for r in run.of_type(ALARM)}
    if not cfg.serving.on_sagemaker:
        assert not alarms
        return
    assert set(alarms) == {"latency-p90", "5xx", "invocations-high", "invocations-none"}
    for alarm in alarms.values():
        assert alarm["namespace"] == "AWS/SageMaker"
        assert alarm["dimensions"] == {"EndpointName": ENDPOINT, "VariantName": "AllTraffic"}
        assert alarm["alarmActions"] == [run.outputs["topic"]]
        assert alarm["period"] * alarm["evaluationPeriods"] <= 86400
    latency = alarms["latency-p90"]
    assert latency["metricName"] == "ModelLatency" and latency["extendedStatistic"] == "p90"
    assert latency["threshold"] == cfg.observability.sagemaker_latency_p90_ms * 1000  # microseconds
    assert alarms["5xx"]["metricName"] == "Invocation5XXErrors" and alarms["5xx"]["threshold"] == 0
    ceiling = cfg.serving.sagemaker_max_instances * cfg.serving.sagemaker_invocations_per_instance
    assert alarms["invocations-high"]["threshold"] == int(ceiling * 0.9)
    assert alarms["invocations-none"]["treatMissingData"] == "breaching"
