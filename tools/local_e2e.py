"""The local end-to-end run: the platform with no cloud account, in a few minutes on 2 CPU cores.

    python -m tools.local_e2e [--steps 60] [--workdir DIR] [--keep]

1. previews the dev stack offline (resources, policy verdicts, monthly cost);
2. starts a local S3 (a moto server on 127.0.0.1) and creates the dev stack's buckets by their real names;
3. trains the debug model with `torchrun --nproc_per_node=2` (gloo), data read from and checkpoints and the
   exported model written to that S3, exactly as the training container does on EKS;
4. starts the serving service on the exported model (downloaded from S3, as on EKS), with an API key;
5. asks one chat question through the official `openai` client;
6. prints a summary and stops everything it started.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from tools.net import free_port, wait_http

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def step(n: int, text: str) -> None:
    print(f"\n[{n}/6] {text}", flush=True)


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def preview_dev() -> dict[str, Any]:
    from infra.preview import preview

    report, run = preview("dev")
    resources = [r for r in run.resources if r.custom]
    print(f"  dev stack: {len(resources)} resources in {len({r.parent for r in resources})} components")
    policy = report.get("policy")
    if policy:
        verdict = "pass" if policy["passed"] else "FAIL"
        print(
            f"  policy: {verdict} ({policy['mandatory_violations']} mandatory, "
            f"{policy['advisory_violations']} advisory violations over {len(policy['rules'])} rules)"
        )
    cost = report.get("cost")
    if cost:
        print(f"  cost: idle ${cost['idle_monthly']:,.0f}/month, peak ${cost['peak_monthly']:,.0f}/month")
    return report


def train(env: dict[str, str], data: str, output: str, export: str, steps: int, log: Path) -> dict[str, Any]:
    cmd = [
        str(BIN / "torchrun"),
        "--nproc_per_node=2",
        "--master_port",
        str(free_port()),
        "-m",
        "training",
        "--preset",
        "debug",
        "--data",
        data,
        "--output",
        output,
        "--export",
        export,
        "--max-steps",
        str(steps),
        "--save-every",
        str(max(steps // 3, 1)),
    ]
    print("  $ " + " ".join(cmd[cmd.index("-m") :]), flush=True)
    last: dict[str, Any] = {}
    first_loss = None
    with log.open("w") as log_file:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log_file, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            log_file.write(line)
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "step" in record and "loss" in record:
                first_loss = record["loss"] if first_loss is None else first_loss
                last = record
                if record["step"] % 10 == 0 or record["step"] == steps:
                    print(
                        f"  step {record['step']:>4}/{steps}  loss {record['loss']:.3f}  "
                        f"{record.get('tokens_per_s', 0):,.0f} tokens/s",
                        flush=True,
                    )
        if proc.wait() != 0:
            raise RuntimeError(f"training failed with status {proc.returncode}; see {log}")
    return {"first_loss": first_loss, **last}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.local_e2e", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    parser.add_argument("--workdir", type=Path, help="where logs and caches go (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)

    started = time.monotonic()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="llm-platform-e2e-"))
    workdir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as cleanup:
        if not args.keep and args.workdir is None:
            cleanup.callback(shutil.rmtree, workdir, ignore_errors=True)

        step(1, "Offline preview of the dev stack")
        report = preview_dev()
        from infra import outputs as out

        buckets = {k: report["outputs"][k] for k in (out.DATASETS_BUCKET, out.CHECKPOINTS_BUCKET, out.MODELS_BUCKET)}

        step(2, "Local S3 (moto on 127.0.0.1) with the dev stack's buckets")
        s3_port = free_port()
        moto = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        cleanup.callback(stop, moto)
        endpoint = f"http://127.0.0.1:{s3_port}"
        wait_http(endpoint + "/moto-api/", 30, moto, "moto server")
        env = {
            **os.environ,
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "local",
            "AWS_SECRET_ACCESS_KEY": "local",
            "AWS_DEFAULT_REGION": report["outputs"][out.REGION],
            "PYTHONPATH": str(REPO),
        }
        env.pop("AWS_PROFILE", None)
        os.environ.update(
            {
                k: env[k]
                for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
            }
        )
        import boto3

        s3 = boto3.client("s3")
        for name in buckets.values():
            s3.create_bucket(Bucket=name)
        # The shipped corpus is a few KB; repeated, it gives both ranks full batches and a loss that visibly falls.
        corpus = (REPO / "training" / "assets" / "corpus.txt").read_bytes() * 40
        s3.put_object(Bucket=buckets[out.DATASETS_BUCKET], Key="corpus/corpus.txt", Body=corpus)
        print(f"  {endpoint}: {', '.join(buckets.values())}")

        step(3, f"Distributed training: torchrun, 2 processes (gloo), {args.steps} steps, checkpoints to S3")
        data = f"s3://{buckets[out.DATASETS_BUCKET]}/corpus/"
        output = f"s3://{buckets[out.CHECKPOINTS_BUCKET]}/runs/debug"
        export = f"s3://{buckets[out.MODELS_BUCKET]}/debug-llama"
        t0 = time.monotonic()
        metrics = train(env, data, output, export, args.steps, workdir / "train.log")
        train_s = time.monotonic() - t0
        checkpoints = s3.list_objects_v2(Bucket=buckets[out.CHECKPOINTS_BUCKET], Prefix="runs/debug/").get(
            "KeyCount", 0
        )
        exported = [o["Key"] for o in s3.list_objects_v2(Bucket=buckets[out.MODELS_BUCKET]).get("Contents", [])]
        print(f"  exported {len(exported)} files to {export}")

        step(4, "Serving the exported model (downloaded from S3) with an API key")
        api_key = "sk-local-" + secrets.token_hex(16)
        keys_file = workdir / "api-keys"
        keys_file.write_text(f"demo {api_key}\n")
        keys_file.chmod(0o600)
        port = free_port()
        serve_log = (workdir / "serve.log").open("w")
        cleanup.callback(serve_log.close)
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "serving",
                "--model",
                export,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--api-keys-file",
                str(keys_file),
                "--model-cache-dir",
                str(workdir / "model-cache"),
            ],
            cwd=REPO,
            env=env,
            stdout=serve_log,
            stderr=subprocess.STDOUT,
        )
        cleanup.callback(stop, server)
        wait_http(f"http://127.0.0.1:{port}/readyz", 120, server, "serving")
        print(f"  ready at http://127.0.0.1:{port}/v1")

        step(5, "One chat request through the openai client")
        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=api_key, max_retries=0)
        model_id = client.models.list().data[0].id
        chat = client.chat.completions.create(
            model=model_id,
            messages=[{"role": "user", "content": "Say something about GPUs."}],
            max_tokens=24,
            temperature=0,
        )
        answer = chat.choices[0].message.content
        print(f"  model {model_id!r} answered ({chat.usage.completion_tokens} tokens): {answer!r}")

        step(6, "Summary")
        summary = {
            "training_steps": metrics.get("step"),
            "loss_first_last": [round(metrics["first_loss"], 4), round(metrics["loss"], 4)],
            "tokens_per_s": round(metrics.get("tokens_per_s", 0)),
            "train_seconds": round(train_s, 1),
            "checkpoint_objects": checkpoints,
            "model": export,
            "served_answer": repr(answer),
            "usage": chat.usage.model_dump(),
            "logs": str(workdir) if (args.keep or args.workdir) else "(removed; use --keep to keep them)",
            "total_seconds": round(time.monotonic() - started, 1),
        }
        for key, value in summary.items():
            print(f"  {key:<20} {value}")
        if not metrics["loss"] < metrics["first_loss"]:
            print("error: the loss did not fall; see the training log (--keep)", file=sys.stderr)
            return 1
    print("\nDone: everything started here has been stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
