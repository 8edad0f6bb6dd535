"""The compression pipeline's student (training.prune, then distillation in the trainer) is an ordinary model for
`python -m serving`: served under the name its export records, int8-quantized, answering the `openai` client."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import openai

from tests.helpers import REPO_ROOT
from tests.serving.conftest import ServerFactory
from training.debug_model import CORPUS_PATH
from training.export import EXPORT_INFO
from training.prune import main as prune


def test_pruned_and_distilled_student_is_served_with_int8(
    start_server: ServerFactory, debug_model_dir: Path, tmp_path: Path
) -> None:
    pruned = tmp_path / "pruned"
    assert prune(["--model", str(debug_model_dir), "--out", str(pruned), "--drop-layers", "1",
                  "--calib", str(CORPUS_PATH), "--seq-len", "32", "--calib-windows", "4"]) == 0  # fmt: skip
    run = tmp_path / "kd"
    train = subprocess.run(
        [sys.executable, "-m", "training", "--model", str(pruned), "--distill-from", str(debug_model_dir),
         "--data", str(CORPUS_PATH), "--output", str(run), "--max-steps", "2", "--save-every", "0",
         "--set", "data.seq_len=32"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    student = run / "model"
    info = json.loads((student / EXPORT_INFO).read_text())
    assert info["distillation"]["teacher"] == str(debug_model_dir)
    assert json.loads((student / "config.json").read_text())["num_hidden_layers"] == 3

    server = start_server("--model", str(student), "--quantization", "int8", "--allow-unauthenticated")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [info["served_model_name"]] == ["pruned-kd"]
    r = client.chat.completions.create(
        model="pruned-kd", messages=[{"role": "user", "content": "hello"}], max_tokens=4, temperature=0
    )
    assert r.usage is not None and r.usage.completion_tokens >= 1
    assert r.choices[0].message.content
