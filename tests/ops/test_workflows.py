"""The GitHub workflows: valid against GitHub's workflow schema, and holding the rules that keep them safe."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ops import teardown
from tests.helpers import REPO_ROOT, STACKS_DIR, WORKFLOWS_DIR

STACKS = sorted(p.name.removeprefix("Pulumi.").removesuffix(".yaml") for p in STACKS_DIR.glob("Pulumi.*.yaml"))
PINNED = re.compile(r"^[\w.-]+/[\w.-]+(/[\w./-]+)?@[0-9a-f]{40}$")
"""A full commit SHA: a tag (`@v4`) is mutable, and whoever controls the action's repository can move it."""
USES_LINE = re.compile(r"^\s*(?:- )?uses:\s*(?P<ref>\S+)(?P<comment>.*)$")
ZIZMOR = Path(sys.executable).with_name("zizmor")
ZIZMOR_IGNORES = {("pr-preview-comment.yml", "dangerous-triggers")}
"""The only findings a workflow may suppress, each with its reasons written beside the ignore comment."""


def _load(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((WORKFLOWS_DIR / name).read_text())
    # YAML 1.1 reads the bare key `on` as the boolean True.
    if True in doc:
        doc["on"] = doc.pop(True)
    return doc


def _all() -> dict[str, dict[str, Any]]:
    return {p.name: _load(p.name) for p in sorted(WORKFLOWS_DIR.glob("*.yml"))}


def _steps(job: dict[str, Any]) -> list[dict[str, Any]]:
    return job.get("steps", [])


def _uses(job: dict[str, Any], action: str) -> list[dict[str, Any]]:
    return [s for s in _steps(job) if s.get("uses", "").split("@")[0] == action]


def test_expected_workflows_exist() -> None:
    assert set(_all()) == {
        "pr-preview.yml",
        "pr-preview-comment.yml",
        "deploy.yml",
        "teardown.yml",
        "ttl-sweep.yml",
        "nightly.yml",
    }


def test_workflows_validate_against_the_github_schema() -> None:
    exe = Path(sys.executable).with_name("check-jsonschema")
    files = [str(p) for p in sorted(WORKFLOWS_DIR.glob("*.yml"))]
    proc = subprocess.run(
        [str(exe), "--builtin-schema", "vendor.github-workflows", *files], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_schema_check_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    stepz: []\n")
    exe = Path(sys.executable).with_name("check-jsonschema")
    proc = subprocess.run(
        [str(exe), "--builtin-schema", "vendor.github-workflows", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0


@pytest.mark.parametrize("name", sorted(p.name for p in WORKFLOWS_DIR.glob("*.yml")))
def test_least_privilege_pinned_and_no_injection(name: str) -> None:
    wf = _load(name)
    assert wf["permissions"] == {}, "grant nothing at the top; each job asks for what it needs"
    for job_id, job in wf["jobs"].items():
        assert "permissions" in job, f"{job_id} must declare its permissions"
        assert "timeout-minutes" in job, f"{job_id} needs a timeout"
        for step in _steps(job):
            if "uses" in step:
                assert PINNED.match(step["uses"]), f"{job_id}: {step['uses']} is not pinned to a full commit SHA"
            # Untrusted text (inputs, PR titles, branch names) reaches scripts through env, never interpolated.
            run = step.get("run", "")
            assert "${{ inputs." not in run and "${{ github.event." not in run, f"{job_id}: interpolation in run"
            if _is_checkout(step):
                assert step.get("with", {}).get("persist-credentials") is False, f"{job_id}: token left in .git"


def _is_checkout(step: dict[str, Any]) -> bool:
    return step.get("uses", "").startswith("actions/checkout@")


def test_pr_offline_preview_needs_no_secrets_and_cannot_write() -> None:
    wf = _load("pr-preview.yml")
    assert set(wf["on"]) == {"pull_request"}, "pull_request_target would run fork code with a write token"
    job = wf["jobs"]["offline-preview"]
    assert job["permissions"] == {"contents": "read"}
    text = yaml.safe_dump(job)
    assert "secrets." not in text and "id-token" not in text
    script = next(s["run"] for s in _steps(job) if s.get("id") == "preview")
    assert '-m ops.preview "$stack" --json' in script and "--compare" in script
    assert sorted(re.search(r"for stack in ([\w ]+); do", script).group(1).split()) == STACKS
    checkouts = [s for s in _steps(job) if _is_checkout(s)]
    assert {c["with"]["path"] for c in checkouts} == {"base", "head"}
    assert any(c["with"].get("ref") == "${{ github.event.pull_request.base.sha }}" for c in checkouts)
    assert _uses(job, "actions/upload-artifact")[0]["with"]["name"] == "pr-preview"


def test_pr_comment_is_one_sticky_comment_posted_without_running_pr_code() -> None:
    preview, comment = _load("pr-preview.yml"), _load("pr-preview-comment.yml")
    assert comment["on"]["workflow_run"]["workflows"] == [preview["name"]]
    (job,) = comment["jobs"].values()
    assert job["permissions"] == {"actions": "read", "pull-requests": "write"}
    assert not any(_is_checkout(s) for s in _steps(job)), "never check out the PR in a job that can write"
    assert "secrets." not in yaml.safe_dump(job)
    script = _uses(job, "actions/github-script")[0]["with"]["script"]
    assert "<!-- llm-platform-preview -->" in script and "updateComment" in script
    assert "head_sha" in script  # only the run's own PR head gets the comment


def test_real_pulumi_preview_only_for_same_repo_prs() -> None:
    job = _load("pr-preview.yml")["jobs"]["pulumi-preview"]
    assert "github.event.pull_request.head.repo.full_name == github.repository" in job["if"]
    assert job["permissions"] == {"contents": "read", "id-token": "write", "pull-requests": "write"}
    assert sorted(job["strategy"]["matrix"]["stack"]) == STACKS
    assert _uses(job, "aws-actions/configure-aws-credentials")[0]["with"]["role-to-assume"].startswith("${{ vars.")
    step = _uses(job, "pulumi/actions")[0]["with"]
    assert step["command"] == "preview" and step["policyPacks"] == "policy" and step["diff"] is True
    assert step["comment-on-pr"] is True


def test_deploy_goes_dev_then_staging_then_prod_behind_approval() -> None:
    wf = _load("deploy.yml")
    assert wf["on"]["push"]["branches"] == ["main"]
    assert wf["concurrency"]["cancel-in-progress"] is False
    jobs = wf["jobs"]
    # Each stack: the AWS layer from GitHub, then the Kubernetes layer from the stack's in-VPC runner
    # (the reachability of each job's runner is proven in tests/infra/test_first_deploy.py).
    order = ["dev-aws", "dev", "staging-aws", "staging", "prod-aws", "prod"]
    assert list(jobs) == order
    assert "needs" not in jobs["dev-aws"]
    assert [jobs[j]["needs"] for j in order[1:]] == order[:-1]
    assert jobs["prod-aws"]["environment"] == jobs["prod"]["environment"] == "production"
    for stack in ("dev", "staging", "prod"):
        # The AWS layer (stack <env>) from GitHub; the cluster layer (stack <env>-cluster, configured by the same
        # stacks/Pulumi.<env>.yaml) from the in-VPC runner (infra/layers.py).
        up = _uses(jobs[f"{stack}-aws"], "pulumi/actions")[0]["with"]
        assert (up["command"], up["stack-name"], up["policyPacks"]) == ("up", stack, "policy")
        script = next(s["run"] for s in _steps(jobs[stack]) if "pulumi up" in s.get("run", ""))
        assert (
            f"pulumi up --yes --diff --stack {stack}-cluster --config-file stacks/Pulumi.{stack}.yaml "
            "--policy-pack policy"
        ) in script
        for job in (f"{stack}-aws", stack):
            assert jobs[job]["permissions"] == {"contents": "read", "id-token": "write"}


def test_every_pulumi_cli_is_the_sdks_release() -> None:
    """The CLI (the engine) the workflows install is the release of the pinned SDK: the engine rules
    tests/infra/test_engine_rules.py states are read at that version."""
    pin = re.search(r"^pulumi==(\S+)$", (REPO_ROOT / "requirements.txt").read_text(), re.M)
    assert pin and pin.group(1) == "3.272.0"
    uses = 0
    for name, wf in _all().items():
        for job in wf["jobs"].values():
            for step in _uses(job, "pulumi/actions"):
                uses += 1
                assert str(step.get("with", {}).get("pulumi-version")) == pin.group(1), f"{name}: {step}"
    assert uses >= 10


def _confirm_script() -> tuple[str, dict[str, str]]:
    step = _load("teardown.yml")["jobs"]["confirm"]["steps"][0]
    return step["run"], step["env"]


@pytest.mark.parametrize(
    ("stack", "confirm", "ok"),
    [
        ("dev", "dev", True),
        ("dev", "staging", False),
        ("prod", "", False),
        ("dev", "dev ", False),
        ("", "", False),
        ("x; rm -rf /", "x; rm -rf /", False),
    ],
)
def test_teardown_confirmation_step_really_checks(stack: str, confirm: str, ok: bool) -> None:
    script, env = _confirm_script()
    assert env == {"STACK": "${{ inputs.stack }}", "CONFIRM": "${{ inputs.confirm }}"}
    proc = subprocess.run(
        ["bash", "-c", script],
        env={**os.environ, "STACK": stack, "CONFIRM": confirm},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (proc.returncode == 0) is ok, proc.stdout


def test_teardown_workflow_gates_production_and_calls_the_tool() -> None:
    wf = _load("teardown.yml")
    inputs = wf["on"]["workflow_dispatch"]["inputs"]
    assert inputs["stack"]["required"] and inputs["confirm"]["required"]
    # The cluster layer from the in-VPC runner, then the AWS layer and the sweep (or, without that runner, the AWS
    # layer alone with --cluster-unreachable).
    cluster, job = wf["jobs"]["cluster-layer"], wf["jobs"]["teardown"]
    assert cluster["needs"] == "confirm" and "inputs.confirm == inputs.stack" in cluster["if"]
    assert cluster["runs-on"].startswith("codebuild-llmp-${{ inputs.stack }}-deployer-")
    assert job["needs"] == ["confirm", "cluster-layer"] and "inputs.confirm == inputs.stack" in job["if"]
    assert "needs.cluster-layer.result == 'success' || inputs.cluster_unreachable" in job["if"]
    for j in (cluster, job):
        assert "'production'" in j["environment"] and "needs.confirm.outputs.production" in j["environment"]
        run = next(s["run"] for s in _steps(j) if "ops.teardown" in s.get("run", ""))
        assert "--confirm-production" in run and '[ "$PRODUCTION" = "true" ]' in run
    run = next(s["run"] for s in _steps(job) if "ops.teardown" in s.get("run", ""))
    assert '("$STACK" --layer aws --json)' in run and "args+=(--cluster-unreachable)" in run


def test_the_production_mark_step_reads_the_stack_files(monkeypatch: pytest.MonkeyPatch) -> None:
    step = next(s for s in _load("teardown.yml")["jobs"]["confirm"]["steps"] if s.get("id") == "mark")
    command = next(line for line in step["run"].splitlines() if line.startswith("python -c"))
    code = shlex.split(command)[2]
    marks = {}
    for stack in STACKS:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "STACK": stack},
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        marks[stack] = proc.stdout.strip()
    assert marks["prod"] == "production=true" and marks["dev"] == "production=false"


def test_ttl_and_nightly_use_flags_the_tool_has() -> None:
    ttl = _load("ttl-sweep.yml")
    assert ttl["on"]["schedule"]
    # List, then per environment the cluster layer from its in-VPC runner, then the AWS layer and the sweep.
    assert list(ttl["jobs"]) == ["expired", "cluster-layer", "expire"]
    step = next(s for s in _steps(ttl["jobs"]["expired"]) if "ops.teardown" in s.get("run", ""))
    assert "vars.DEV_STACK_TTL_HOURS" in step["env"]["TTL_HOURS"]
    assert ttl["jobs"]["cluster-layer"]["runs-on"].startswith("codebuild-llmp-${{ matrix.stack }}-deployer-")
    assert ttl["jobs"]["expire"]["needs"] == ["expired", "cluster-layer"]
    for job, flags in (("expired", ["--expired", "--list"]), ("cluster-layer", ["--layer", "cluster"])):
        command = next(s["run"] for s in _steps(ttl["jobs"][job]) if "ops.teardown" in s.get("run", ""))
        line = command.splitlines()[0].split("$(", 1)[-1].split(" | ", 1)[0]
        argv = shlex.split(line.replace('"$TTL_HOURS"', "12"))
        args = teardown.parser().parse_args(argv[argv.index("ops.teardown") + 1 :])
        assert all(f in argv for f in flags), (job, argv)
    command = next(s["run"] for s in _steps(ttl["jobs"]["expire"]) if "ops.teardown" in s.get("run", ""))
    argv = shlex.split(command)
    args = teardown.parser().parse_args(argv[argv.index("ops.teardown") + 1 :])
    assert args.layer == "aws" and args.force
    nightly = _load("nightly.yml")
    assert nightly["on"]["schedule"]
    (njob,) = nightly["jobs"].values()
    runs = [s.get("run", "") for s in _steps(njob)]
    assert any("pytest -m cloud tests/ops/test_cloud_integration.py" in r for r in runs)
    assert (REPO_ROOT / "tests/ops/test_cloud_integration.py").exists()
    for command in [r for r in runs if "ops.teardown" in r]:
        argv = shlex.split(command.replace('"$TTL_HOURS"', "12"))
        args = teardown.parser().parse_args(argv[argv.index("ops.teardown") + 1 :])
        assert args.expired and args.force and args.layer == "aws" and args.cluster_unreachable


STUB_PREVIEW = """
import json, sys
stack = sys.argv[1]
if "--compare" in sys.argv:
    base = json.load(open(sys.argv[sys.argv.index("--compare") + 1]))
    print(f"### `{stack}` compared with a base of {len(base)} keys")
    sys.exit(0)
if stack == "prod":
    print("error: invalid stack configuration: vpcCidr", file=sys.stderr)
    sys.exit(2)
print(json.dumps({"stack": stack}))
sys.exit(3 if stack == "staging" else 0)  # staging: policy violated
"""


def test_offline_preview_script_handles_policy_failures_and_a_base_without_the_tool(tmp_path: Path) -> None:
    """Run the workflow's own script, under the runner's `bash -eo pipefail`, against a stub preview module."""
    (tmp_path / "head" / "ops").mkdir(parents=True)
    (tmp_path / "head" / "ops" / "__init__.py").write_text("")
    (tmp_path / "head" / "ops" / "preview.py").write_text(STUB_PREVIEW)
    (tmp_path / "base").mkdir()  # the base branch predates ops.preview
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "python").symlink_to(sys.executable)
    step = next(s for s in _load("pr-preview.yml")["jobs"]["offline-preview"]["steps"] if s.get("id") == "preview")
    env = {
        **os.environ,
        "GITHUB_WORKSPACE": str(tmp_path),
        "GITHUB_OUTPUT": str(tmp_path / "gh-output"),
        "GITHUB_STEP_SUMMARY": str(tmp_path / "summary"),
        "PR_NUMBER": "42",
        "BASE_SHA": "a" * 40,
        "HEAD_SHA": "b" * 40,
    }
    proc = subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "gh-output").read_text().strip() == "failed=1"
    comment = (tmp_path / "out" / "comment.md").read_text()
    assert comment.startswith("<!-- llm-platform-preview -->")
    assert "### `dev` compared with a base of 0 keys" in comment
    assert "### `staging` compared with a base of 0 keys" in comment  # policy failure: still compared
    assert "### `prod`" in comment and "Preview failed (exit 2)" in comment and "vpcCidr" in comment
    assert (tmp_path / "out" / "pr-number").read_text().strip() == "42"


def _third_party_imports(paths: list[Path]) -> set[str]:
    import ast

    # The repository's own packages (infra, policy, tools, ...) are not installed: they come with the checkout.
    local = {p.parent.name for p in REPO_ROOT.glob("*/__init__.py")} | {"tests", "__main__"}
    found: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m not in local}


def _closure(requirement_lines: list[str]) -> set[str]:
    """Distribution names installed by these pinned lines, dependencies included (read from this venv)."""
    from importlib import metadata

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    todo = [norm(line.split("==")[0]) for line in requirement_lines]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [norm(re.split(r"[\s;<>=!~\[(]", r, maxsplit=1)[0]) for r in requires if "extra ==" not in r]
    return seen


def _our_files(entries: list[str]) -> list[Path]:
    """The files of our own modules that these entry points (modules or globs) import, transitively: what a job that
    runs them executes from the checkout."""
    import ast

    todo = [p for e in entries for p in (sorted(REPO_ROOT.glob(e)) if "/" in e else [_module_file(e)])]
    seen: list[Path] = []
    while todo:
        path = todo.pop()
        if path is None or path in seen:
            continue
        seen.append(path)
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            todo += [_module_file(n) for n in names]
    return seen


def _module_file(module: str) -> Path | None:
    base = REPO_ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


# What each workflow's jobs run from the checkout: the Pulumi program (`pulumi up` / `preview` runs infra/__main__.py)
# and the policy pack (`policyPacks: policy`), `python -m ops.preview`, `python -m ops.teardown`, the nightly test.
@pytest.mark.parametrize(
    ("workflow", "sources"),
    [
        ("deploy.yml", ["infra.__main__", "policy.__main__"]),
        ("pr-preview.yml", ["infra.__main__", "policy.__main__", "ops.preview"]),
        ("teardown.yml", ["ops.teardown", "ops.automation"]),
        ("ttl-sweep.yml", ["ops.teardown"]),
        (
            "nightly.yml",
            ["ops.teardown", "tests/conftest.py", "tests/ops/conftest.py", "tests/ops/test_cloud_integration.py"],
        ),
    ],
)
def test_the_slim_install_covers_every_import(workflow: str, sources: list[str]) -> None:
    """The jobs install only the infrastructure's share of requirements.txt: it must provide every import."""
    from importlib import metadata

    pattern = re.compile(_load(workflow)["env"]["INFRA_REQUIREMENTS"])
    lines = [line for line in (REPO_ROOT / "requirements.txt").read_text().splitlines() if pattern.match(line)]
    installed = _closure(lines)
    providers = metadata.packages_distributions()
    paths = _our_files(sources)
    assert len(paths) > len(sources)  # the entry points' own imports were followed
    missing = {}
    for module in _third_party_imports(paths):
        dists = {re.sub(r"[-_.]+", "-", d).lower() for d in providers.get(module, [module])}
        if not dists & installed:
            missing[module] = sorted(dists)
    assert not missing, f"{workflow} installs {sorted(installed)} but the code imports {missing}"


def test_every_action_is_pinned_to_a_commit_with_its_version_beside_it() -> None:
    # `uses: owner/repo@<40-hex sha>  # vX.Y.Z`: the SHA is what runs, the comment is what a reviewer (and
    # Dependabot) reads; one action is pinned to one commit across all workflows, so an upgrade is one decision.
    pins: dict[str, set[tuple[str, str]]] = {}
    lines = 0
    for path in sorted(WORKFLOWS_DIR.glob("*.yml")):
        for line in path.read_text().splitlines():
            m = USES_LINE.match(line)
            if not m:
                continue
            lines += 1
            assert PINNED.match(m["ref"]), f"{path.name}: {line.strip()}"
            version = re.fullmatch(r"\s+# (v\d+\.\d+\.\d+)", m["comment"])
            assert version, f"{path.name}: {line.strip()} needs its exact version in a comment (# vX.Y.Z)"
            action, sha = m["ref"].split("@")
            pins.setdefault(action, set()).add((sha, version[1]))
    assert lines >= 30
    assert {a: len(p) for a, p in pins.items()} == dict.fromkeys(pins, 1), pins


def _zizmor(*inputs: Path) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [str(ZIZMOR), "--offline", "--format", "json", *map(str, inputs)], capture_output=True, text=True, timeout=120
    )
    assert proc.stdout.strip(), proc.stderr
    return json.loads(proc.stdout)


def test_zizmor_reports_no_high_finding() -> None:
    # zizmor (pinned in requirements.txt, also run by `make lint`) audits the workflows offline: unpinned actions,
    # dangerous triggers, template injection, credential persistence, excessive permissions.
    high = [f for f in _zizmor(WORKFLOWS_DIR) if f["determinations"]["severity"] == "High" and not f["ignored"]]
    assert high == [], [(f["ident"], f["locations"][0]["symbolic"]["key"]) for f in high]


def test_zizmor_can_fail_and_suppressions_are_the_known_ones(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "on: push\npermissions: {}\njobs:\n  a:\n    runs-on: ubuntu-latest\n    permissions: {}\n"
        "    steps:\n      - uses: actions/checkout@v4\n        with:\n          persist-credentials: false\n"
    )
    assert {f["ident"] for f in _zizmor(bad) if f["determinations"]["severity"] == "High"} == {"unpinned-uses"}
    ignores = {
        (path.name, rule)
        for path in WORKFLOWS_DIR.glob("*.yml")
        for rule in re.findall(r"zizmor: ignore\[([\w-]+)\]", path.read_text())
    }
    assert ignores == ZIZMOR_IGNORES


def test_the_workflow_run_comment_job_never_runs_pull_request_code() -> None:
    # What justifies its one zizmor suppression: no checkout, no shell step, only the artifact download and the
    # github-script that checks the PR number against the triggering run's head SHA.
    wf = _load("pr-preview-comment.yml")
    assert set(wf["on"]) == {"workflow_run"}
    (job,) = wf["jobs"].values()
    assert [s["uses"].split("@")[0] for s in _steps(job)] == ["actions/download-artifact", "actions/github-script"]
    assert not [s for s in _steps(job) if "run" in s]
    assert "pr.head.sha !== context.payload.workflow_run.head_sha" in _steps(job)[1]["with"]["script"]
