"""Tear an environment down in layers, so that nothing tagged for it is left: `python -m ops.teardown <env>`.

An environment is two stacks (infra/layers.py): the cluster layer `<env>-cluster` and the AWS layer `<env>`. Order:

1. Resolve: the AWS layer's outputs (cluster name, region, kubeconfig, production mark) are read *before* anything is
   destroyed; an `--outputs` file naming another stack is refused. Production-marked stacks are refused unless
   `--confirm-production <env>` repeats the name.
2. The cluster layer (`--layer cluster`, from where its API answers: the in-VPC runner): Services of type
   LoadBalancer, Ingresses and PersistentVolumeClaims are deleted through the cluster's API and waited for (the
   controllers that created their load balancers and volumes are about to go), then `pulumi destroy <env>-cluster`.
3. The AWS layer (`--layer aws`, any runner): refused while the cluster layer still holds resources, then
   `pulumi destroy <env>`. With `--cluster-unreachable` (the in-VPC runner is gone) the AWS layer goes first, and
   once the cluster no longer exists the cluster layer's state is dropped with PULUMI_K8S_DELETE_UNREACHABLE=true.
4. Sweep: the account/region is searched for anything still owned by the environment (ops/sweep.py) and reported.
   `--force` deletes what was found, except what a Pulumi state still holds (or may hold, when the states cannot be
   read): only Pulumi deletes that. A destroy the leftovers blocked is retried.

`--layer all` (default) runs 2, 3 and 4 in order (a workstation that reaches the cluster API). `--sweep-only` destroys
nothing and works without the Pulumi CLI; without --force it is a dry run.

Exit codes: 0 nothing left (the final sweep is clean and every destroy succeeded); 1 leftovers, or a failed destroy or
deletion; 2 bad usage, refused, or no usable AWS credentials.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from facts.tags import STACK_TAG
from infra import outputs as keys
from infra.layers import cluster_stack, environment_of
from ops import automation
from ops.sweep import Finding, Ownership, Sweeper, report_text

EXIT_CLEAN = 0
EXIT_LEFTOVERS = 1
EXIT_REFUSED = 2
DELETE_UNREACHABLE = "PULUMI_K8S_DELETE_UNREACHABLE"
"""pulumi-kubernetes drops a resource from the state when its cluster cannot be reached (provider/pkg/provider/
provider.go `deleteUnreachable`); set only once the cluster itself is deleted."""

Log = Callable[[str], None]
KUBE_TIMEOUT = (5, 30)
"""(connect, read) seconds for every Kubernetes API call: the client's default is to wait forever, and a private
endpoint seen from outside the VPC would hang the teardown instead of letting it fall back on the sweep."""


# ---- phase 2: Kubernetes objects that own AWS resources --------------------------------------------------------


@dataclass(frozen=True, order=True)
class KubeRef:
    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


@dataclass
class KubePlan:
    """What the pre-destroy cleanup deletes, in the order it deletes it."""

    network: list[KubeRef] = field(default_factory=list)
    """Ingresses and LoadBalancer Services: the AWS Load Balancer Controller (or the in-tree provider) owns an
    ELB/ALB/NLB, target groups and security groups for each."""
    claims: list[KubeRef] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    """PersistentVolumes bound to those claims whose reclaim policy is Delete: the CSI driver deletes their EBS
    volume, then the PV object; the PV disappearing is the signal the volume is gone."""
    retained_volumes: list[str] = field(default_factory=list)
    """Bound PVs with reclaim policy Retain: their EBS volume outlives everything and is left to the sweep."""
    pods: list[KubeRef] = field(default_factory=list)
    """Pods that mount the claims: the pvc-protection finalizer holds a claim until no pod uses it."""


def plan_kubernetes_cleanup(core: Any, networking: Any) -> KubePlan:
    """Select the objects to delete. `core`/`networking` are CoreV1Api / NetworkingV1Api (or a test fake)."""
    plan = KubePlan()
    for ing in networking.list_ingress_for_all_namespaces(_request_timeout=KUBE_TIMEOUT).items:
        plan.network.append(KubeRef("Ingress", ing.metadata.namespace, ing.metadata.name))
    for svc in core.list_service_for_all_namespaces(_request_timeout=KUBE_TIMEOUT).items:
        if svc.spec and svc.spec.type == "LoadBalancer":
            plan.network.append(KubeRef("Service", svc.metadata.namespace, svc.metadata.name))
    claim_names: set[tuple[str, str]] = set()
    for pvc in core.list_persistent_volume_claim_for_all_namespaces(_request_timeout=KUBE_TIMEOUT).items:
        ref = KubeRef("PersistentVolumeClaim", pvc.metadata.namespace, pvc.metadata.name)
        plan.claims.append(ref)
        claim_names.add((ref.namespace, ref.name))
        volume_name = pvc.spec.volume_name if pvc.spec else None
        if volume_name:
            pv = core.read_persistent_volume(volume_name, _request_timeout=KUBE_TIMEOUT)
            if (pv.spec.persistent_volume_reclaim_policy or "Delete") == "Delete":
                plan.volumes.append(volume_name)
            else:
                plan.retained_volumes.append(volume_name)
    for pod in core.list_pod_for_all_namespaces(_request_timeout=KUBE_TIMEOUT).items:
        for vol in (pod.spec.volumes or []) if pod.spec else []:
            claim = vol.persistent_volume_claim
            if claim and (pod.metadata.namespace, claim.claim_name) in claim_names:
                plan.pods.append(KubeRef("Pod", pod.metadata.namespace, pod.metadata.name))
                break
    for part in (plan.network, plan.claims, plan.pods):
        part.sort()
    plan.volumes.sort()
    plan.retained_volumes.sort()
    return plan


def _delete(core: Any, networking: Any, ref: KubeRef) -> None:
    from kubernetes.client import V1DeleteOptions
    from kubernetes.client.exceptions import ApiException

    # Foreground: the object stays visible until its dependants and finalizers are done, so "gone" means done.
    body = V1DeleteOptions(propagation_policy="Foreground")
    call = {
        "Ingress": networking.delete_namespaced_ingress,
        "Service": core.delete_namespaced_service,
        "PersistentVolumeClaim": core.delete_namespaced_persistent_volume_claim,
        "Pod": core.delete_namespaced_pod,
    }[ref.kind]
    try:
        call(ref.name, ref.namespace, body=body, _request_timeout=KUBE_TIMEOUT)
    except ApiException as err:
        if err.status != 404:  # already gone is what we want
            raise


def _remaining(core: Any, networking: Any, plan: KubePlan) -> list[str]:
    live = {
        KubeRef("Ingress", i.metadata.namespace, i.metadata.name)
        for i in networking.list_ingress_for_all_namespaces(_request_timeout=KUBE_TIMEOUT).items
    }
    live |= {
        KubeRef("Service", s.metadata.namespace, s.metadata.name)
        for s in core.list_service_for_all_namespaces(_request_timeout=KUBE_TIMEOUT).items
    }
    live |= {
        KubeRef("PersistentVolumeClaim", c.metadata.namespace, c.metadata.name)
        for c in core.list_persistent_volume_claim_for_all_namespaces(_request_timeout=KUBE_TIMEOUT).items
    }
    pvs = {pv.metadata.name for pv in core.list_persistent_volume(_request_timeout=KUBE_TIMEOUT).items}
    left = [str(r) for r in plan.network + plan.claims if r in live]
    left += [f"PersistentVolume {v}" for v in plan.volumes if v in pvs]
    return left


def run_kubernetes_cleanup(
    core: Any,
    networking: Any,
    log: Log,
    timeout_s: float = 900,
    poll_s: float = 10,
    sleep: Callable[[float], None] = time.sleep,
) -> list[str]:
    """Delete the network objects, wait; delete claims (and the pods holding them), wait. Returns what is left."""
    plan = plan_kubernetes_cleanup(core, networking)
    log(
        f"  {len(plan.network)} Ingress/LoadBalancer Service(s), {len(plan.claims)} claim(s), "
        f"{len(plan.volumes)} volume(s) to release"
    )
    for ref in plan.retained_volumes:
        log(f"  PersistentVolume {ref} has reclaim policy Retain: its EBS volume stays; the sweep will report it")
    # Load balancers first: they hold ENIs in the subnets and reference node security groups; waiting for them
    # before touching volumes keeps the two controllers' work (and failures) apart in the log.
    for ref in plan.network:
        log(f"  deleting {ref}")
        _delete(core, networking, ref)
    left = _wait(
        lambda: [r for r in _remaining(core, networking, plan) if not r.startswith(("Persistent",))],
        log,
        timeout_s,
        poll_s,
        sleep,
    )
    if left:
        return left
    for ref in plan.claims + plan.pods:
        log(f"  deleting {ref}")
        _delete(core, networking, ref)
    return _wait(lambda: _remaining(core, networking, plan), log, timeout_s, poll_s, sleep)


def _wait(
    check: Callable[[], list[str]], log: Log, timeout_s: float, poll_s: float, sleep: Callable[[float], None]
) -> list[str]:
    waited = 0.0
    while True:
        left = check()
        if not left:
            return []
        if waited >= timeout_s:
            log(f"  still present after {timeout_s:.0f}s: {', '.join(left)}")
            return left
        log(f"  waiting for {len(left)} object(s): {', '.join(left[:5])}{' ...' if len(left) > 5 else ''}")
        sleep(poll_s)
        waited += poll_s


def kube_clients(kubeconfig: Any) -> tuple[Any, Any]:
    """CoreV1Api and NetworkingV1Api for the stack's kubeconfig output (a dict, or JSON/YAML text)."""
    import yaml
    from kubernetes import client, config

    cfg = kubeconfig if isinstance(kubeconfig, Mapping) else yaml.safe_load(kubeconfig)
    configuration = client.Configuration()
    config.load_kube_config_from_dict(dict(cfg), client_configuration=configuration)
    api = client.ApiClient(configuration)
    return client.CoreV1Api(api), client.NetworkingV1Api(api)


def wait_for_controller_resources(
    sweeper: Sweeper, log: Log, timeout_s: float, poll_s: float = 15, sleep: Callable[[float], None] = time.sleep
) -> list[Finding]:
    """After the Kubernetes objects are gone, wait until AWS agrees that controller-owned load balancers are gone.

    The in-tree provider does not hold a Service's deletion until its ELB is gone, and AWS deletes LBs
    asynchronously, so the Kubernetes-side wait alone can finish before the cluster's AWS resources do.
    Volumes need no AWS-side wait: the CSI provisioner's finalizer keeps a PV until its EBS volume is deleted.
    """
    return [] if not sweeper.ownership.cluster_name else _wait_findings(sweeper, log, timeout_s, poll_s, sleep)


def _wait_findings(
    sweeper: Sweeper, log: Log, timeout_s: float, poll_s: float, sleep: Callable[[float], None]
) -> list[Finding]:
    waited = 0.0
    while True:
        left = sweeper.find_controller_owned_load_balancers()
        if not left or waited >= timeout_s:
            return left
        log(
            f"  waiting for {len(left)} controller-owned AWS resource(s) to go: "
            + ", ".join(f"{f.kind} {f.id}" for f in left[:5])
        )
        sleep(poll_s)
        waited += poll_s


# ---- the command ---------------------------------------------------------------------------------------------

LAYERS = ("all", "cluster", "aws")


@dataclass(frozen=True, kw_only=True)
class TeardownOptions:
    """What one teardown does (the command line, typed)."""

    stack: str
    """The environment (`<env>`; `<env>-cluster` names the same one)."""
    layer: str = "all"
    """`cluster`: the cluster layer only (from inside the VPC); `aws`: the AWS layer, then the sweep; `all`: both."""
    cluster_unreachable: bool = False
    """With layer aws: the in-VPC runner is gone. Destroy the AWS layer first (it deletes the cluster), then drop the
    cluster layer's state with PULUMI_K8S_DELETE_UNREACHABLE=true, once the cluster no longer exists."""
    force: bool = False
    sweep_only: bool = False
    skip_kubernetes: bool = False
    confirm_production: str | None = None
    region: str | None = None
    cluster_name: str | None = None
    account_id: str | None = None
    outputs_file: Path | None = None
    wait_timeout: float = 900
    poll: float = 10
    json: bool = False


@dataclass
class TeardownResult:
    """What a teardown found and did; `exit_code` is the command's."""

    stack: str
    exit_code: int
    region: str = ""
    account_id: str | None = None
    ownership: Ownership | None = None
    destroyed: list[str] = field(default_factory=list)
    """The stacks destroyed, in order."""
    leftovers: list[Finding] = field(default_factory=list)
    held_by_state: list[Finding] = field(default_factory=list)
    """Found by the sweep but still in a Pulumi state: only Pulumi deletes them (never deleted here)."""
    phase_failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    delete_failures: list[str] = field(default_factory=list)
    refused: str | None = None

    @property
    def clean(self) -> bool:
        return not self.leftovers and not self.phase_failures and not self.delete_failures

    def to_json(self) -> dict[str, Any]:
        return {
            "stack": self.stack,
            "region": self.region,
            "account_id": self.account_id,
            "ownership": (vars(self.ownership) | {"stack_tag": STACK_TAG}) if self.ownership else None,
            "destroyed": self.destroyed,
            "clean": self.clean,
            "leftovers": [f.to_json() for f in self.leftovers],
            "held_by_state": [f.to_json() for f in self.held_by_state],
            "phase_failures": self.phase_failures,
            "warnings": self.warnings,
            "delete_failures": self.delete_failures,
        }


@dataclass
class Resolved:
    stack: str
    stack_tag: str
    region: str
    cluster_name: str | None
    outputs: dict[str, Any]
    production: bool
    account_id: str | None


class Refused(Exception):
    """A usage or configuration problem: exit 2 with this message, nothing touched."""


def read_outputs_file(path: Path, stack: str) -> dict[str, Any]:
    """Outputs from a file (`pulumi stack output --json --show-secrets`, or `python -m ops.preview --json`, which
    wraps them), refused when they belong to another environment. Every tool taking a stack and an outputs file
    uses this."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise Refused(f"--outputs {path}: cannot read it as JSON: {exc}") from None
    outputs = dict(data.get("outputs", data)) if isinstance(data, dict) else {}
    named = outputs.get(keys.STACK)
    if named is not None and environment_of(str(named)) != environment_of(stack):
        raise Refused(
            f"--outputs {path} holds the outputs of stack '{named}', not '{stack}': refusing to act on one "
            f"environment with another's names. Pass the outputs of '{stack}' (pulumi stack output --json "
            f"--show-secrets --stack {environment_of(stack)})"
        )
    return outputs


def _account_from(outputs: Mapping[str, Any]) -> str | None:
    for key in (keys.TRAINING_ROLE_ARN, keys.SERVING_ROLE_ARN, keys.KMS_KEY_ARN, keys.SAGEMAKER_EXECUTION_ROLE_ARN):
        value = outputs.get(key)
        if isinstance(value, str) and value.startswith("arn:"):
            parts = value.split(":")
            if len(parts) > 4 and parts[4].isdigit():
                return parts[4]
    return None


def resolve(opts: TeardownOptions, log: Log) -> Resolved:
    """Everything the later phases need; raises Refused with the reason to refuse."""
    env = environment_of(opts.stack)
    if opts.outputs_file:
        outputs = read_outputs_file(opts.outputs_file, env)
    elif automation.pulumi_cli() is None:
        if not opts.sweep_only:
            raise Refused(automation.MISSING_CLI_MESSAGE)
        outputs = {}
    else:
        log(f"reading outputs of stack '{env}' (the AWS layer) ...")
        try:
            outputs = automation.stack_outputs(env)
        except Exception as exc:  # no such stack, not logged in to the backend
            raise Refused(f"cannot read the outputs of stack '{env}': {exc}") from None
    config = automation.read_stack_config(env)
    region = (
        opts.region
        or outputs.get(keys.REGION)
        or config.get(automation.REGION_KEY)
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
    )
    if not region:
        raise Refused("no region: pass --region, or make the stack's outputs/config available")
    tags = outputs.get(keys.TAGS) or {}
    return Resolved(
        stack=env,
        stack_tag=tags.get(STACK_TAG) or env.rsplit("/", 1)[-1],
        region=region,
        cluster_name=opts.cluster_name or outputs.get(keys.CLUSTER_NAME) or None,
        outputs=outputs,
        production=automation.is_production(config, outputs),
        account_id=opts.account_id or _account_from(outputs),
    )


CREDENTIAL_ERRORS = (
    "ExpiredToken",
    "ExpiredTokenException",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "AuthFailure",
    "SignatureDoesNotMatch",
    "InvalidAccessKeyId",
)


def credentials_problem(exc: BaseException) -> str | None:
    """The message for an AWS credentials failure (exit 2, a configuration problem), or None for anything else."""
    from botocore.exceptions import ClientError, NoCredentialsError, NoRegionError, PartialCredentialsError

    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return f"no AWS credentials ({exc}); configure them (AWS_PROFILE, or `aws sso login`) and run again"
    if isinstance(exc, NoRegionError):
        return f"no AWS region ({exc}); pass --region"
    if isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in CREDENTIAL_ERRORS:
        return f"the AWS credentials were refused ({exc}); refresh them and run again"
    return None


def plan_layers(opts: TeardownOptions) -> list[tuple[str, bool]]:
    """The stacks `pulumi destroy` runs on, in order, each with whether PULUMI_K8S_DELETE_UNREACHABLE is set
    (infra/reach.py reads the same plan from the workflows' command lines)."""
    env = environment_of(opts.stack)
    plan: list[tuple[str, bool]] = []
    if opts.sweep_only:
        return plan
    if opts.layer in ("cluster", "all") and not opts.cluster_unreachable:
        plan.append((cluster_stack(env), False))
    if opts.layer in ("aws", "all"):
        plan.append((env, False))
        if opts.cluster_unreachable:
            plan.append((cluster_stack(env), True))
    return plan


def teardown(
    opts: TeardownOptions,
    log: Log = print,
    sweeper_factory: Callable[[Ownership, str], Sweeper] = Sweeper,
) -> TeardownResult:
    """Tear an environment down in layers (cluster layer, AWS layer, sweep) and say what is left."""
    result = TeardownResult(stack=environment_of(opts.stack), exit_code=EXIT_REFUSED)
    log(f"== resolve stack '{result.stack}'")
    try:
        resolved = resolve(opts, log)
    except Refused as exc:
        result.refused = str(exc)
        return result
    destructive = not opts.sweep_only or opts.force
    if resolved.production and destructive and opts.confirm_production != result.stack:
        result.refused = (
            f"refused: stack '{result.stack}' is marked production (llm-platform:production). Repeat its name with "
            f"--confirm-production {result.stack} if you really mean to destroy it."
        )
        return result
    ownership = Ownership(resolved.stack_tag, resolved.cluster_name)
    result.region, result.account_id, result.ownership = resolved.region, resolved.account_id, ownership
    log(
        f"  account {resolved.account_id or '(unknown until AWS answers)'}, region {resolved.region}, stack tag "
        f"{STACK_TAG}={resolved.stack_tag}, "
        f"cluster {resolved.cluster_name or '(none known: controller-created resources cannot be matched)'}"
    )
    sweeper = sweeper_factory(ownership, resolved.region)
    try:
        _run_layers(opts, resolved, sweeper, result, log)
        if opts.layer != "cluster" or opts.sweep_only:
            _sweep(opts, resolved, sweeper, result, log)
    except Exception as exc:
        problem = credentials_problem(exc)
        if problem is None:
            raise
        result.refused = problem
        result.exit_code = EXIT_REFUSED
        return result
    result.exit_code = EXIT_CLEAN if result.clean else EXIT_LEFTOVERS
    return result


def _run_layers(opts: TeardownOptions, resolved: Resolved, sweeper: Sweeper, result: TeardownResult, log: Log) -> None:
    plan = plan_layers(opts)
    if not plan:
        log("== no layer destroyed (--sweep-only)")
        return
    env = resolved.stack
    cluster_layer = cluster_stack(env)
    for stack, delete_unreachable in plan:
        if stack == cluster_layer and not delete_unreachable:
            _kubernetes_cleanup(opts, resolved, sweeper, result, log)
        if stack == env and opts.layer == "aws" and not opts.cluster_unreachable:
            # The cluster layer goes first, from where its API answers; never leave its objects orphaned.
            held = automation.state_resources(cluster_layer)
            if held:
                result.phase_failures.append(
                    f"the cluster layer {cluster_layer} still holds {len(held)} resource(s): run "
                    f"`python -m ops.teardown {env} --layer cluster` on the in-VPC runner first (or pass "
                    "--cluster-unreachable if that runner is gone); the AWS layer was not touched"
                )
                return
        if delete_unreachable:
            if _cluster_exists(sweeper, resolved.cluster_name):
                result.phase_failures.append(
                    f"cluster {resolved.cluster_name} still exists: not dropping {cluster_layer}'s state with "
                    "PULUMI_K8S_DELETE_UNREACHABLE (it would orphan live objects)"
                )
                return
            log(f"== pulumi destroy {stack} with PULUMI_K8S_DELETE_UNREACHABLE=true (the cluster is gone)")
        else:
            log(f"== pulumi destroy {stack}")
        error = _destroy(stack, log, {DELETE_UNREACHABLE: "true"} if delete_unreachable else None)
        if error:
            result.phase_failures.append(error)
            if stack == cluster_layer:
                return  # never take the AWS layer from under objects still in the cluster layer's state
        else:
            result.destroyed.append(stack)


def _cluster_exists(sweeper: Sweeper, name: str | None) -> bool:
    if not name:
        return False
    try:
        sweeper.client("eks").describe_cluster(name=name)
    except Exception as exc:
        if "ResourceNotFound" in type(exc).__name__ or "ResourceNotFound" in str(exc):
            return False
        raise
    return True


def _kubernetes_cleanup(
    opts: TeardownOptions, resolved: Resolved, sweeper: Sweeper, result: TeardownResult, log: Log
) -> None:
    log("== delete Kubernetes objects that own AWS resources")
    kubeconfig = resolved.outputs.get(keys.KUBECONFIG)
    if opts.skip_kubernetes:
        log("  skipped (--skip-kubernetes)")
        return
    if not kubeconfig:
        log("  no kubeconfig output: no cluster to clean")
        return
    try:
        core, networking = kube_clients(kubeconfig)
        left = run_kubernetes_cleanup(core, networking, log, timeout_s=opts.wait_timeout, poll_s=opts.poll)
    except Exception as exc:  # unreachable (private endpoint), forbidden, expired token ...
        left = [f"Kubernetes cleanup failed: {exc}"]
        log(f"  Kubernetes cleanup FAILED: {exc}")
    left_aws = (
        []
        if left and left[0].startswith("Kubernetes cleanup failed")
        else wait_for_controller_resources(sweeper, log, timeout_s=opts.wait_timeout, poll_s=opts.poll)
    )
    result.warnings += left + [f"still present after the wait: {f.service} {f.kind} {f.id}" for f in left_aws]


def _held_by_state(env: str, log: Log) -> set[str] | None:
    """Ids and ARNs both layers' states hold; None when the states cannot be read (no CLI)."""
    if automation.pulumi_cli() is None:
        return None
    held: set[str] = set()
    for stack in (env, cluster_stack(env)):
        try:
            held |= automation.held_identifiers(automation.state_resources(stack))
        except Exception as exc:
            log(f"  cannot read the state of {stack}: {exc}")
            return None
    return held


def _sweep(opts: TeardownOptions, resolved: Resolved, sweeper: Sweeper, result: TeardownResult, log: Log) -> None:
    """Find leftovers; with --force delete those no Pulumi state holds, then retry a destroy they blocked."""
    log(f"== sweep {resolved.region} for leftovers")
    findings = sweeper.find()
    if findings and opts.force:
        held = _held_by_state(resolved.stack, log)
        deletable, kept = [], []
        for f in findings:
            by_stack_tag = f.matched_by.startswith(f"{STACK_TAG}=")
            if by_stack_tag and (held is None or f.id in held or (f.arn and f.arn in held)):
                # Pulumi created it (its stack tag); only Pulumi deletes it while a state may hold it.
                kept.append(f)
            else:
                deletable.append(f)
        result.held_by_state = kept
        if kept:
            why = "a Pulumi state holds them" if held is not None else "the Pulumi states cannot be read (no CLI)"
            log(f"  not deleting {len(kept)} stack-tagged resource(s): {why}; `pulumi destroy` deletes them")
        log(report_text(deletable, sweeper.ownership, resolved.region))
        log(f"--force: deleting {sum(f.deletable for f in deletable)} deletable leftover(s)")
        result.delete_failures = sweeper.delete(deletable, log=log, wait_s=opts.wait_timeout)
        failed_destroys = [p for p in result.phase_failures if p.startswith(f"pulumi destroy {resolved.stack}:")]
        if failed_destroys and not result.delete_failures:
            # What blocked the destroy is typically what the sweep just removed (a controller's load balancer ENIs
            # keep the subnets and VPC alive): one more destroy finishes the job.
            log(f"== pulumi destroy {resolved.stack} again, now that the leftovers are gone")
            if not _destroy(resolved.stack, log):
                for p in failed_destroys:
                    result.phase_failures.remove(p)
                result.destroyed.append(resolved.stack)
        findings = sweeper.find()
    result.leftovers = findings


def _destroy(stack: str, log: Log, env: Mapping[str, str] | None = None) -> str | None:
    """Run `pulumi destroy`; the error line on failure (the CLI's CommandError carries its stderr)."""
    try:
        changes = automation.destroy(stack, on_output=lambda line: log("  " + line.rstrip()), env=env)
    except Exception as exc:
        log(f"  pulumi destroy FAILED: {exc}")
        return f"pulumi destroy {stack}: {exc}"
    log(f"  destroy done: {changes}")
    return None


def expired_environments(ttl_hours: float, patterns: list[str] | None, log: Log) -> list[str]:
    """The environments (either layer's stack matching) idle longer than the TTL; production never, whatever its
    name (the TTL job has no business there, confirmation flag or not)."""
    ttl = timedelta(hours=ttl_hours)
    names = automation.expired_stacks(
        automation.list_stack_ages(), datetime.now(UTC), ttl, patterns or automation.DEFAULT_TTL_PATTERNS
    )
    envs = []
    for env in sorted({environment_of(n) for n in names}):
        if automation.is_production(automation.read_stack_config(env)):
            log(f"skipping '{env}': production-marked")
        else:
            envs.append(env)
    return envs


def report(result: TeardownResult, opts: TeardownOptions, out: TextIO, err: TextIO) -> int:
    if result.refused:
        print(result.refused, file=err)
        return result.exit_code
    if opts.json:
        print(json.dumps(result.to_json(), indent=2, default=str), file=out)
    else:
        if result.ownership is not None:
            print(report_text(result.leftovers, result.ownership, result.region), file=out, end="")
        for f in result.held_by_state:
            print(f"held by a Pulumi state (not deleted): {f.service} {f.kind} {f.id}", file=out)
        for line in result.warnings:
            print(f"warning: {line}", file=out)
        for line in result.phase_failures + result.delete_failures:
            print(f"problem: {line}", file=out)
    return result.exit_code


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ops.teardown",
        description="Destroy an environment in layers and prove nothing tagged for it is left (exit 0 clean, "
        "1 leftovers or a failed step, 2 refused / bad usage / no usable AWS credentials).",
    )
    p.add_argument(
        "stack", nargs="?", help="environment (stacks/Pulumi.<stack>.yaml; its stacks <stack>, <stack>-cluster)"
    )
    p.add_argument(
        "--layer",
        choices=LAYERS,
        default="all",
        help="cluster: the cluster layer only (run it where the cluster API answers: the in-VPC runner); aws: the "
        "AWS layer, then the sweep (refused while the cluster layer holds resources); all (default): both, in order",
    )
    p.add_argument(
        "--cluster-unreachable",
        action="store_true",
        help="with --layer aws, when the in-VPC runner is gone: destroy the AWS layer (and with it the cluster), then "
        "drop the cluster layer's state with PULUMI_K8S_DELETE_UNREACHABLE=true",
    )
    p.add_argument(
        "--confirm-production", metavar="STACK", help="required for production-marked stacks: repeat the stack name"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="delete leftovers the sweep finds (only resources owned by this stack and held by no Pulumi state)",
    )
    p.add_argument(
        "--sweep-only",
        action="store_true",
        help="destroy nothing; only sweep (works without the Pulumi CLI; a dry run unless --force)",
    )
    p.add_argument("--skip-kubernetes", action="store_true", help="skip the pre-destroy Kubernetes cleanup")
    p.add_argument("--region", help="AWS region (default: the stack's region output, then its config)")
    p.add_argument("--cluster-name", help="EKS cluster name (default: the stack's cluster_name output)")
    p.add_argument("--account-id", help="AWS account the sweep is for (default: from the outputs' ARNs)")
    p.add_argument(
        "--outputs",
        metavar="FILE",
        type=Path,
        help="stack outputs as JSON (`pulumi stack output --json --show-secrets`) instead of the CLI; refused when "
        "they are another stack's",
    )
    p.add_argument(
        "--wait-timeout",
        type=float,
        default=900,
        metavar="SECONDS",
        help="how long to wait for controller-owned AWS resources and deletions (default 900)",
    )
    p.add_argument(
        "--poll", type=float, default=10, metavar="SECONDS", help="interval between checks while waiting (default 10)"
    )
    p.add_argument("--json", action="store_true", help="print the final sweep report as JSON on stdout")
    p.add_argument(
        "--expired",
        action="store_true",
        help="every environment matching --pattern whose last update is older than --ttl-hours",
    )
    p.add_argument(
        "--list", action="store_true", help="with --expired: print the expired environments as a JSON list and stop"
    )
    p.add_argument("--ttl-hours", type=float, default=12.0, help="TTL for --expired (default 12)")
    p.add_argument(
        "--pattern",
        action="append",
        help=f"stack name glob for --expired (repeatable; default {' '.join(automation.DEFAULT_TTL_PATTERNS)})",
    )
    return p


def options(args: argparse.Namespace, stack: str | None = None) -> TeardownOptions:
    return TeardownOptions(
        stack=stack or args.stack,
        layer=args.layer,
        cluster_unreachable=args.cluster_unreachable,
        force=args.force,
        sweep_only=args.sweep_only,
        skip_kubernetes=args.skip_kubernetes,
        confirm_production=None if stack else args.confirm_production,
        region=args.region,
        cluster_name=args.cluster_name,
        account_id=args.account_id,
        outputs_file=args.outputs,
        wait_timeout=args.wait_timeout,
        poll=args.poll,
        json=args.json,
    )


def main(argv: list[str] | None = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    p = parser()
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad usage already; keep it a return value for tests
        return int(exc.code or 0)
    if args.expired == bool(args.stack):
        print("give either a stack name or --expired", file=err)
        return EXIT_REFUSED
    if args.confirm_production and args.confirm_production != args.stack:
        print(f"--confirm-production must repeat the stack name '{args.stack}'", file=err)
        return EXIT_REFUSED
    if args.cluster_unreachable and args.layer != "aws":
        print("--cluster-unreachable goes with --layer aws", file=err)
        return EXIT_REFUSED
    # Progress goes to stderr under --json so stdout stays one parseable document.
    progress = err if args.json else out

    def log(msg: str) -> None:
        print(msg, file=progress, flush=True)

    if not args.expired:
        return report(teardown(options(args), log), options(args), out, err)
    if automation.pulumi_cli() is None:
        print(automation.MISSING_CLI_MESSAGE, file=err)
        return EXIT_REFUSED
    envs = expired_environments(args.ttl_hours, args.pattern, log)
    if args.list:
        print(json.dumps(envs), file=out)
        return EXIT_CLEAN
    print(f"environments past their {args.ttl_hours}h TTL: {', '.join(envs) or 'none'}", file=progress)
    worst = EXIT_CLEAN
    for env in envs:
        opts = options(args, env)
        worst = max(worst, report(teardown(opts, log), opts, out, err))
    return worst


if __name__ == "__main__":
    sys.exit(main())
