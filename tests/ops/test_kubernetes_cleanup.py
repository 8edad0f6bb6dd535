"""Pre-destroy Kubernetes cleanup: which objects are selected and in what order they go.

There is no cluster here, so a thin fake (`kube_cluster`, tests/ops/conftest.py) stands in for CoreV1Api and
NetworkingV1Api: it answers the same list, read and delete calls with the kubernetes client's own model objects, and
imitates the finalizers that make a deleted object linger (the load balancer controller's, pvc-protection, the CSI
provisioner's on PVs).
"""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client as k
from kubernetes.client.exceptions import ApiException

from ops.teardown import KubeRef, plan_kubernetes_cleanup, run_kubernetes_cleanup
from tests.ops.conftest import FakeCluster


def test_plan_selects_only_objects_that_own_aws_resources(kube_cluster: FakeCluster) -> None:
    c = kube_cluster
    plan = plan_kubernetes_cleanup(c, c)
    assert plan.network == [KubeRef("Ingress", "serving", "api"), KubeRef("Service", "serving", "gateway")]
    assert plan.claims == [
        KubeRef("PersistentVolumeClaim", "serving", "cache"),
        KubeRef("PersistentVolumeClaim", "training", "scratch"),
        KubeRef("PersistentVolumeClaim", "training", "unbound"),
    ]
    assert plan.volumes == ["pv-1"] and plan.retained_volumes == ["pv-2"]
    assert plan.pods == [KubeRef("Pod", "training", "trainer-0")]


def test_network_objects_go_and_are_waited_for_before_any_claim(kube_cluster: FakeCluster) -> None:
    c = kube_cluster
    c.linger = 3
    sleeps: list[float] = []
    log: list[str] = []
    left = run_kubernetes_cleanup(c, c, log.append, timeout_s=600, poll_s=5, sleep=sleeps.append)
    assert left == []
    assert c.calls[:2] == ["Ingress serving/api", "Service serving/gateway"]
    assert set(c.calls[2:]) == {
        "PersistentVolumeClaim serving/cache",
        "PersistentVolumeClaim training/scratch",
        "PersistentVolumeClaim training/unbound",
        "Pod training/trainer-0",
    }
    assert sleeps, "finalizers linger: the cleanup must have waited"
    remaining = {key for key in c.objects}
    assert ("Service", "serving", "engine") in remaining  # ClusterIP services are left to pulumi destroy
    assert ("PersistentVolume", "", "pv-2") in remaining  # Retain: stays, the sweep reports its volume
    assert ("PersistentVolume", "", "pv-1") not in remaining
    assert any("Retain" in line for line in log)


def test_a_stuck_load_balancer_stops_the_cleanup_and_is_reported(kube_cluster: FakeCluster) -> None:
    c = kube_cluster
    c.stuck.add(("Ingress", "serving", "api"))  # e.g. the controller lacks IAM permissions to delete the ALB
    left = run_kubernetes_cleanup(c, c, lambda _: None, timeout_s=30, poll_s=10, sleep=lambda _: None)
    assert left == ["Ingress serving/api"]
    assert not any(call.startswith("PersistentVolumeClaim") for call in c.calls)


def test_an_object_deleted_by_someone_else_meanwhile_is_fine(kube_cluster: FakeCluster) -> None:
    c = kube_cluster
    original = c.delete_namespaced_service

    def raced(name: str, namespace: str, body: Any, **kw: Any) -> None:
        c.objects.pop(("Service", namespace, name))  # gone between the plan and the delete: the API answers 404
        original(name, namespace, body, **kw)

    c.delete_namespaced_service = raced  # type: ignore[method-assign]
    assert run_kubernetes_cleanup(c, c, lambda _: None, timeout_s=60, poll_s=1, sleep=lambda _: None) == []
    assert "Service serving/gateway" in c.calls


def test_other_api_errors_are_not_swallowed(kube_cluster: FakeCluster) -> None:
    c = kube_cluster

    def forbidden(name: str, namespace: str, body: Any, **_: Any) -> None:
        raise ApiException(status=403, reason="Forbidden")

    c.delete_namespaced_ingress = forbidden  # type: ignore[method-assign]
    with pytest.raises(ApiException):
        run_kubernetes_cleanup(c, c, lambda _: None, timeout_s=10, poll_s=1, sleep=lambda _: None)


def test_kube_clients_are_built_from_the_kubeconfig_output() -> None:
    from ops.teardown import kube_clients

    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "dev",
        "clusters": [{"name": "dev", "cluster": {"server": "https://dev.example.invalid"}}],
        "users": [{"name": "dev", "user": {"token": "t"}}],
        "contexts": [{"name": "dev", "context": {"cluster": "dev", "user": "dev"}}],
    }
    import json

    core, networking = kube_clients(json.dumps(kubeconfig))  # the program exports it as JSON text
    assert isinstance(core, k.CoreV1Api) and isinstance(networking, k.NetworkingV1Api)
    assert core.api_client.configuration.host == "https://dev.example.invalid"


def test_the_fake_only_implements_real_client_methods() -> None:
    """Keep the fake honest: every method it offers exists on the real API classes and takes the same arguments."""
    import inspect

    for name, method in inspect.getmembers(FakeCluster, inspect.isfunction):
        if name.startswith(("list_", "read_", "delete_")):
            real = getattr(k.CoreV1Api, name, None) or getattr(k.NetworkingV1Api, name)
            real_params = [p for p in inspect.signature(real).parameters if p not in ("self", "kwargs")]
            fake_params = [p for p in inspect.signature(method).parameters if p not in ("self", "_request_timeout")]
            assert fake_params[: len(real_params)] == real_params, name
            # The rest (body, _request_timeout) travel in the real method's **kwargs: it must list them as known.
            owner = k.CoreV1Api if hasattr(k.CoreV1Api, name) else k.NetworkingV1Api
            source = inspect.getsource(getattr(owner, name + "_with_http_info"))
            for extra in [*fake_params[len(real_params) :], "_request_timeout"]:
                assert f"'{extra}'" in source, f"{name} does not accept {extra}"


def test_waits_for_controller_load_balancers_until_aws_agrees() -> None:
    from ops.sweep import Finding, Ownership
    from ops.teardown import wait_for_controller_resources

    class Sweeper:
        ownership = Ownership("dev", "llm-platform-dev")

        def __init__(self, answers: list[list[Finding]]) -> None:
            self.answers = answers

        def find_controller_owned_load_balancers(self) -> list[Finding]:
            return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]

    lb = Finding("elbv2", "load-balancer", "k8s-gw", None, "elbv2.k8s.aws/cluster=llm-platform-dev")
    sleeps: list[float] = []
    assert wait_for_controller_resources(Sweeper([[lb], [lb], []]), lambda _: None, 60, 5, sleeps.append) == []
    assert sleeps == [5, 5]
    sleeps.clear()
    assert wait_for_controller_resources(Sweeper([[lb]]), lambda _: None, 12, 5, sleeps.append) == [lb]
    assert sum(sleeps) >= 12  # gave up only after the timeout
    nameless = Sweeper([[lb]])
    nameless.ownership = Ownership("dev")  # no cluster: nothing of a controller can be recognised, so no wait
    assert wait_for_controller_resources(nameless, lambda _: None, 60, 5, sleeps.append) == []
