"""Pre-destroy Kubernetes cleanup: which objects are selected and in what order they go.

There is no cluster here, so a thin fake stands in for CoreV1Api/NetworkingV1Api: it answers the same list,
read and delete calls with the kubernetes client's own model objects, and imitates the finalizers that make a
deleted object linger (the load balancer controller's, pvc-protection, the CSI provisioner's on PVs).
"""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client as k
from kubernetes.client.exceptions import ApiException

from ops.teardown import KubeRef, plan_kubernetes_cleanup, run_kubernetes_cleanup


def _meta(ns: str | None, name: str) -> k.V1ObjectMeta:
    return k.V1ObjectMeta(namespace=ns, name=name)


class FakeCluster:
    """Objects by kind; a deleted object disappears after `linger` more list calls (its finalizers running)."""

    def __init__(self, linger: int = 1) -> None:
        self.linger = linger
        self.objects: dict[tuple[str, str, str], Any] = {}
        self.terminating: dict[tuple[str, str, str], int] = {}
        self.calls: list[str] = []
        self.stuck: set[tuple[str, str, str]] = set()

    def add(self, kind: str, obj: Any) -> None:
        self.objects[(kind, obj.metadata.namespace or "", obj.metadata.name)] = obj

    def _tick(self) -> None:
        for key in list(self.terminating):
            self.terminating[key] -= 1
            if self.terminating[key] <= 0 and key not in self.stuck and self._released(key):
                self.objects.pop(key, None)
                self.terminating.pop(key)

    def _released(self, key: tuple[str, str, str]) -> bool:
        if key[0] == "PersistentVolumeClaim":  # pvc-protection: no pod may still mount it
            return not any(
                kind == "Pod"
                and any(
                    v.persistent_volume_claim and v.persistent_volume_claim.claim_name == key[2]
                    for v in pod.spec.volumes or []
                )
                for (kind, _, _), pod in self.objects.items()
            )
        return True

    def _list(self, kind: str, wrapper: Any) -> Any:
        self._tick()
        # PVs whose claim is gone and whose policy is Delete are removed by the (imitated) CSI provisioner.
        claims = {o.spec.volume_name for (kd, _, _), o in self.objects.items() if kd == "PersistentVolumeClaim"}
        for key, pv in list(self.objects.items()):
            if (
                key[0] == "PersistentVolume"
                and pv.spec.persistent_volume_reclaim_policy == "Delete"
                and key[2] not in claims
                and key not in self.stuck
            ):
                self.objects.pop(key)
        return wrapper(items=[o for (kd, _, _), o in self.objects.items() if kd == kind])

    def _delete(self, kind: str, name: str, namespace: str, body: k.V1DeleteOptions) -> None:
        assert body.propagation_policy == "Foreground"
        self.calls.append(f"{kind} {namespace}/{name}")
        key = (kind, namespace, name)
        if key not in self.objects:
            raise ApiException(status=404, reason="Not Found")
        self.terminating.setdefault(key, self.linger)

    # -- the CoreV1Api / NetworkingV1Api surface used by ops.teardown
    def list_service_for_all_namespaces(self, *, _request_timeout: object) -> k.V1ServiceList:
        return self._list("Service", k.V1ServiceList)

    def list_ingress_for_all_namespaces(self, *, _request_timeout: object) -> k.V1IngressList:
        return self._list("Ingress", k.V1IngressList)

    def list_persistent_volume_claim_for_all_namespaces(
        self, *, _request_timeout: object
    ) -> k.V1PersistentVolumeClaimList:
        return self._list("PersistentVolumeClaim", k.V1PersistentVolumeClaimList)

    def list_persistent_volume(self, *, _request_timeout: object) -> k.V1PersistentVolumeList:
        return self._list("PersistentVolume", k.V1PersistentVolumeList)

    def list_pod_for_all_namespaces(self, *, _request_timeout: object) -> k.V1PodList:
        return self._list("Pod", k.V1PodList)

    def read_persistent_volume(self, name: str, *, _request_timeout: object) -> k.V1PersistentVolume:
        return self.objects[("PersistentVolume", "", name)]

    def delete_namespaced_service(
        self, name: str, namespace: str, body: k.V1DeleteOptions, *, _request_timeout: object
    ) -> None:
        self._delete("Service", name, namespace, body)

    def delete_namespaced_ingress(
        self, name: str, namespace: str, body: k.V1DeleteOptions, *, _request_timeout: object
    ) -> None:
        self._delete("Ingress", name, namespace, body)

    def delete_namespaced_persistent_volume_claim(
        self, name: str, namespace: str, body: k.V1DeleteOptions, *, _request_timeout: object
    ) -> None:
        self._delete("PersistentVolumeClaim", name, namespace, body)

    def delete_namespaced_pod(
        self, name: str, namespace: str, body: k.V1DeleteOptions, *, _request_timeout: object
    ) -> None:
        self._delete("Pod", name, namespace, body)


def _cluster(linger: int = 1) -> FakeCluster:
    c = FakeCluster(linger)
    lb = k.V1ServiceSpec(type="LoadBalancer")
    c.add("Service", k.V1Service(metadata=_meta("serving", "gateway"), spec=lb))
    c.add("Service", k.V1Service(metadata=_meta("serving", "engine"), spec=k.V1ServiceSpec(type="ClusterIP")))
    c.add("Service", k.V1Service(metadata=_meta("default", "kubernetes"), spec=k.V1ServiceSpec(type="ClusterIP")))
    c.add("Ingress", k.V1Ingress(metadata=_meta("serving", "api")))
    for ns, claim, pv, policy in (("training", "scratch", "pv-1", "Delete"), ("serving", "cache", "pv-2", "Retain")):
        c.add(
            "PersistentVolumeClaim",
            k.V1PersistentVolumeClaim(metadata=_meta(ns, claim), spec=k.V1PersistentVolumeClaimSpec(volume_name=pv)),
        )
        c.add(
            "PersistentVolume",
            k.V1PersistentVolume(
                metadata=_meta(None, pv), spec=k.V1PersistentVolumeSpec(persistent_volume_reclaim_policy=policy)
            ),
        )
    c.add(
        "PersistentVolumeClaim",
        k.V1PersistentVolumeClaim(  # pending: never bound, no PV
            metadata=_meta("training", "unbound"), spec=k.V1PersistentVolumeClaimSpec()
        ),
    )
    mount = k.V1Volume(name="data", persistent_volume_claim=k.V1PersistentVolumeClaimVolumeSource(claim_name="scratch"))
    c.add("Pod", k.V1Pod(metadata=_meta("training", "trainer-0"), spec=k.V1PodSpec(containers=[], volumes=[mount])))
    c.add(
        "Pod",
        k.V1Pod(
            metadata=_meta("serving", "engine-0"),
            spec=k.V1PodSpec(containers=[], volumes=[k.V1Volume(name="tmp", empty_dir=k.V1EmptyDirVolumeSource())]),
        ),
    )
    return c


def test_plan_selects_only_objects_that_own_aws_resources() -> None:
    c = _cluster()
    plan = plan_kubernetes_cleanup(c, c)
    assert plan.network == [KubeRef("Ingress", "serving", "api"), KubeRef("Service", "serving", "gateway")]
    assert plan.claims == [
        KubeRef("PersistentVolumeClaim", "serving", "cache"),
        KubeRef("PersistentVolumeClaim", "training", "scratch"),
        KubeRef("PersistentVolumeClaim", "training", "unbound"),
    ]
    assert plan.volumes == ["pv-1"] and plan.retained_volumes == ["pv-2"]
    assert plan.pods == [KubeRef("Pod", "training", "trainer-0")]


def test_network_objects_go_and_are_waited_for_before_any_claim() -> None:
    c = _cluster(linger=3)
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


def test_a_stuck_load_balancer_stops_the_cleanup_and_is_reported() -> None:
    c = _cluster()
    c.stuck.add(("Ingress", "serving", "api"))  # e.g. the controller lacks IAM permissions to delete the ALB
    left = run_kubernetes_cleanup(c, c, lambda _: None, timeout_s=30, poll_s=10, sleep=lambda _: None)
    assert left == ["Ingress serving/api"]
    assert not any(call.startswith("PersistentVolumeClaim") for call in c.calls)


def test_an_object_deleted_by_someone_else_meanwhile_is_fine() -> None:
    c = _cluster()
    original = c.delete_namespaced_service

    def raced(name: str, namespace: str, body: Any, **kw: Any) -> None:
        c.objects.pop(("Service", namespace, name))  # gone between the plan and the delete: the API answers 404
        original(name, namespace, body, **kw)

    c.delete_namespaced_service = raced  # type: ignore[method-assign]
    assert run_kubernetes_cleanup(c, c, lambda _: None, timeout_s=60, poll_s=1, sleep=lambda _: None) == []
    assert "Service serving/gateway" in c.calls


def test_other_api_errors_are_not_swallowed() -> None:
    c = _cluster()

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
