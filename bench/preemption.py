"""How long a SIGTERM checkpoint takes: torchrun (2 ranks, CPU/gloo) fine-tuning SmolLM2-135M-Instruct with its
checkpoints on S3 (a local moto server), SIGTERM to torchrun after the first step, time until it exits.

    python bench/preemption.py [--model DIR]

Prints the trainer's own `save_s` (local DCP write + upload + marker), the seconds from SIGTERM to torchrun's exit,
and its exit status (143 expected). The grace periods in training/torchrun.py and ops/training_k8s_job.py must cover
the second number with room to spare; docs/training.md records a run of this script.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ops.net import free_port, wait_http  # noqa: E402
from training.torchrun import shutdown_timeout  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="HF model directory (default: ops.smollm2's cached SmolLM2-135M-Instruct)")
    p.add_argument("--grace", type=int, default=120, help="grace period to derive --shutdown-timeout from")
    args = p.parse_args()
    grace = args.grace
    if args.model:
        model = args.model
    else:
        from ops.smollm2 import ensure

        model = str(ensure())
    bindir = Path(sys.executable).parent
    port = free_port()
    moto = subprocess.Popen([str(bindir / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/moto-api/", 30, moto, "moto")
        env = dict(os.environ, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="x",
                   AWS_SECRET_ACCESS_KEY="x", AWS_DEFAULT_REGION="us-east-1", PYTHONPATH=str(REPO))  # fmt: skip
        import boto3

        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1", aws_access_key_id="x",
                     aws_secret_access_key="x").create_bucket(Bucket="ckpt")  # fmt: skip
        with tempfile.TemporaryDirectory() as scratch:
            env["TRAINING_LOCAL_DIR"] = scratch
            cmd = [sys.executable, "-m", "training.torchrun", "--nproc_per_node=2", f"--master_port={free_port()}",
                   f"--shutdown-timeout={shutdown_timeout(grace)}",
                   "-m", "training", "--model", model, "--data", str(REPO / "training/assets/chat.jsonl"),
                   "--output", "s3://ckpt/run", "--max-steps", "100", "--save-every", "0"]  # fmt: skip
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert proc.stdout is not None and proc.stderr is not None
            preempted, sent = None, 0.0
            for line in proc.stdout:
                if not line.startswith("{"):
                    continue
                record = json.loads(line)
                if "loss" in record and not sent:
                    proc.send_signal(signal.SIGTERM)  # what the kubelet / SageMaker does to PID 1
                    sent = time.monotonic()
                if record.get("event") == "preempted":
                    preempted = record
            rc = proc.wait()
            exit_s = time.monotonic() - sent
            stderr = proc.stderr.read()
    finally:
        moto.terminate()
        moto.wait()
    result = {"model": Path(model).name, "exit_status": rc, "save_s": (preempted or {}).get("save_s"),
              "sigterm_to_exit_s": round(exit_s, 1), "traceback": "Traceback" in stderr}  # fmt: skip
    print(json.dumps(result))
    if result["traceback"] or rc != 143:
        print(stderr[-4000:], file=sys.stderr)
    return 0 if rc == 143 and preempted else 1


if __name__ == "__main__":
    raise SystemExit(main())
