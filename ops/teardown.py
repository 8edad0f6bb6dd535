"""Tear a stack down so that nothing tagged for it is left: `python -m ops.teardown <stack>`.

Phases, in this order because each one removes what would block or outlive the next:

1. Resolve: the stack's outputs (cluster name, region, kubeconfig, production mark) are read *before* anything is
   destroyed, since they vanish with the stack. Production-marked stacks are refused unless
   `--confirm-production <stack>` repeats the stack name.
2. Kubernetes: Services of type LoadBalancer, Ingresses and PersistentVolumeClaims are deleted through the
   cluster's API and waited for. Their AWS resources (load balancers, target groups, security groups, EBS
   volumes) were created by controllers running *in* the cluster; once `pulumi destroy` removes the cluster and
   the controllers, nothing would ever delete them, and the load balancers' ENIs would block the VPC's deletion.
3. Destroy: `pulumi destroy` through the Automation API.
4. Sweep: the account/region is searched for anything still owned by the stack (see ops/sweep.py for how
   ownership is decided) and reported. `--force` deletes what was found, then sweeps again.

Exit codes: 0 nothing left (the final sweep is clean and destroy succeeded); 1 leftovers, or a failed destroy or
deletion; 2 bad usage or refused.
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
from ops import automation
from ops.sweep import Finding, Ownership, Sweeper, report_text

EXIT_CLEAN = 0
EXIT_LEFTOVERS = 1
EXIT_REFUSED = 2

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


@dataclass
class Resolved:
    stack: str
    stack_tag: str
    region: str
    cluster_name: str | None
    outputs: dict[str, Any]
    production: bool


def _load_outputs(args: argparse.Namespace, log: Log) -> dict[str, Any] | None:
    if args.outputs:
        data = json.loads(Path(args.outputs).read_text())
        # `python -m ops.preview <stack> --json` wraps them in {"outputs": ...}; `pulumi stack output --json`
        # gives them bare.
        return dict(data.get("outputs", data)) if isinstance(data, dict) else {}
    if automation.pulumi_cli() is None:
        return None
    log(f"reading outputs of stack '{args.stack}' ...")
    return automation.stack_outputs(args.stack)


def resolve(args: argparse.Namespace, log: Log) -> Resolved | str:
    """Everything the later phases need, or the reason to refuse (a str)."""
    outputs = _load_outputs(args, log)
    if outputs is None:
        if not args.sweep_only:
            return automation.MISSING_CLI_MESSAGE
        outputs = {}
    config = automation.read_stack_config(args.stack)
    region = (
        args.region
        or outputs.get(keys.REGION)
        or config.get(automation.REGION_KEY)
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
    )
    if not region:
        return "no region: pass --region, or make the stack's outputs/config available"
    tags = outputs.get(keys.TAGS) or {}
    stack_tag = tags.get(STACK_TAG) or args.stack.rsplit("/", 1)[-1]
    return Resolved(
        stack=args.stack,
        stack_tag=stack_tag,
        region=region,
        cluster_name=args.cluster_name or outputs.get(keys.CLUSTER_NAME) or None,
        outputs=outputs,
        production=automation.is_production(config, outputs),
    )


def teardown(
    args: argparse.Namespace,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    sweeper_factory: Callable[[Ownership, str], Sweeper] = Sweeper,
) -> int:
    # Progress goes to stderr under --json so stdout stays one parseable document.
    progress = err if args.json else out

    def log(msg: str) -> None:
        print(msg, file=progress, flush=True)

    log(f"== phase 1/4: resolve stack '{args.stack}'")
    try:
        resolved = resolve(args, log)
    except Exception as exc:  # no such stack, not logged in to the backend, unreadable --outputs file
        resolved = f"cannot read the outputs of stack '{args.stack}': {exc}"
    if isinstance(resolved, str):
        print(resolved, file=err)
        return EXIT_REFUSED
    destructive = not args.sweep_only or args.force
    if resolved.production and destructive and args.confirm_production != args.stack:
        print(
            f"refused: stack '{args.stack}' is marked production (llm-platform:production). Repeat its name with "
            f"--confirm-production {args.stack} if you really mean to destroy it.",
            file=err,
        )
        return EXIT_REFUSED
    ownership = Ownership(resolved.stack_tag, resolved.cluster_name)
    log(
        f"  region {resolved.region}, stack tag {STACK_TAG}={resolved.stack_tag}, "
        f"cluster {resolved.cluster_name or '(none known: controller-created resources cannot be matched)'}"
    )
    sweeper = sweeper_factory(ownership, resolved.region)
    failed: list[str] = []  # phases that left the stack not provably gone: exit 1
    warnings: list[str] = []  # pre-destroy steps that did not finish; the final sweep decides whether it mattered
    destroy_error: str | None = None

    if args.sweep_only:
        log("== phases 2-3 skipped (--sweep-only)")
    else:
        log("== phase 2/4: delete Kubernetes objects that own AWS resources")
        kubeconfig = resolved.outputs.get(keys.KUBECONFIG)
        if args.skip_kubernetes:
            log("  skipped (--skip-kubernetes)")
        elif not kubeconfig:
            log("  no kubeconfig output: no cluster to clean")
        else:
            try:
                core, networking = kube_clients(kubeconfig)
                left = run_kubernetes_cleanup(core, networking, log, timeout_s=args.wait_timeout, poll_s=args.poll)
            except Exception as exc:  # unreachable (private endpoint), forbidden, expired token ...
                # Destroying anyway is still right: the sweep finds what the controllers leave by their cluster
                # tags, and --force deletes it (then retries the destroy the leftovers blocked).
                left = [f"Kubernetes cleanup failed: {exc}"]
                log(f"  Kubernetes cleanup FAILED: {exc}")
            # Nothing was asked to delete the load balancers if the cluster could not be reached: don't wait.
            left_aws = (
                []
                if left and left[0].startswith("Kubernetes cleanup failed")
                else wait_for_controller_resources(sweeper, log, timeout_s=args.wait_timeout, poll_s=args.poll)
            )
            warnings += left + [f"still present after the wait: {f.service} {f.kind} {f.id}" for f in left_aws]
            if warnings:
                log("  continuing to destroy; the sweep will report what the controllers did not delete")
        log("== phase 3/4: pulumi destroy")
        destroy_error = _destroy(args.stack, log)
        if destroy_error:
            failed.append(destroy_error)

    log(f"== phase 4/4: sweep {resolved.region} for leftovers")
    findings = sweeper.find()
    deleted_failures: list[str] = []
    if findings and args.force:
        log(report_text(findings, ownership, resolved.region))
        log(f"--force: deleting {sum(f.deletable for f in findings)} deletable leftover(s)")
        deleted_failures = sweeper.delete(findings, log=log, wait_s=args.wait_timeout)
        if destroy_error and not deleted_failures:
            # What blocked the destroy is typically what the sweep just removed (a controller's load balancer
            # ENIs keep the subnets and VPC alive): one more destroy finishes the job.
            log("== phase 3/4 again: pulumi destroy, now that the leftovers are gone")
            if not _destroy(args.stack, log):
                failed.remove(destroy_error)
        findings = sweeper.find()
    if args.json:
        doc = {
            "stack": args.stack,
            "region": resolved.region,
            "ownership": vars(ownership) | {"stack_tag": STACK_TAG},
            "clean": not findings,
            "leftovers": [f.to_json() for f in findings],
            "phase_failures": failed,
            "warnings": warnings,
            "delete_failures": deleted_failures,
        }
        print(json.dumps(doc, indent=2, default=str), file=out)
    else:
        print(report_text(findings, ownership, resolved.region), file=out, end="")
        for line in warnings:
            print(f"warning: {line}", file=out)
        for line in failed + deleted_failures:
            print(f"problem: {line}", file=out)
    return EXIT_CLEAN if not findings and not failed and not deleted_failures else EXIT_LEFTOVERS


def _destroy(stack: str, log: Log) -> str | None:
    """Run `pulumi destroy`; the error line on failure (the CLI's CommandError carries its stderr)."""
    try:
        changes = automation.destroy(stack, on_output=lambda line: log("  " + line.rstrip()))
    except Exception as exc:
        log(f"  pulumi destroy FAILED: {exc}")
        return f"pulumi destroy failed: {exc}"
    log(f"  destroy done: {changes}")
    return None


def teardown_expired(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """The scheduled TTL teardown: every matching stack idle longer than the TTL, one after another."""
    if automation.pulumi_cli() is None:
        print(automation.MISSING_CLI_MESSAGE, file=err)
        return EXIT_REFUSED
    ttl = timedelta(hours=args.ttl_hours)
    names = automation.expired_stacks(
        automation.list_stack_ages(), datetime.now(UTC), ttl, args.pattern or automation.DEFAULT_TTL_PATTERNS
    )
    print(f"stacks past their {args.ttl_hours}h TTL: {', '.join(names) or 'none'}", file=out)
    worst = EXIT_CLEAN
    for name in names:
        # Never production: the TTL job has no business there, confirmation flag or not.
        if automation.is_production(automation.read_stack_config(name)):
            print(f"skipping '{name}': production-marked", file=out)
            continue
        sub = argparse.Namespace(**{**vars(args), "stack": name, "confirm_production": None})
        worst = max(worst, teardown(sub, out, err))
    return worst


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ops.teardown",
        description="Destroy a stack and prove nothing tagged for it is left (exit 0 clean, 1 leftovers, "
        "2 refused / bad usage).",
    )
    p.add_argument("stack", nargs="?", help="stack name (stacks/Pulumi.<stack>.yaml)")
    p.add_argument(
        "--confirm-production", metavar="STACK", help="required for production-marked stacks: repeat the stack name"
    )
    p.add_argument(
        "--force", action="store_true", help="delete leftovers the sweep finds (only resources owned by this stack)"
    )
    p.add_argument(
        "--sweep-only",
        action="store_true",
        help="skip Kubernetes cleanup and pulumi destroy; only sweep (works without the Pulumi CLI)",
    )
    p.add_argument("--skip-kubernetes", action="store_true", help="skip the pre-destroy Kubernetes cleanup")
    p.add_argument("--region", help="AWS region (default: the stack's region output, then its config)")
    p.add_argument("--cluster-name", help="EKS cluster name (default: the stack's cluster_name output)")
    p.add_argument(
        "--outputs",
        metavar="FILE",
        help="stack outputs as JSON (`pulumi stack output --json --show-secrets`) instead of the CLI",
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
        help="tear down every stack matching --pattern whose last update is older than --ttl-hours",
    )
    p.add_argument("--ttl-hours", type=float, default=12.0, help="TTL for --expired (default 12)")
    p.add_argument(
        "--pattern",
        action="append",
        help=f"stack name glob for --expired (repeatable; default {' '.join(automation.DEFAULT_TTL_PATTERNS)})",
    )
    return p


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
    return teardown_expired(args, out, err) if args.expired else teardown(args, out, err)


if __name__ == "__main__":
    sys.exit(main())
