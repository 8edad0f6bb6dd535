"""Every command the README and docs/*.md tell people to run still exists with the flags they show: `make TARGET`
must be a target, and `python -m MODULE ARGS` must parse with the module's own argument parser (the module runs up to
its `parse_args` and stops there, so nothing is built, trained or deployed). A renamed flag or module fails here."""

from __future__ import annotations

import argparse
import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from infra.config import load_stack
from tests.helpers import REPO_ROOT

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[a-z]*\n(.*?)^```", re.M | re.S)
PREFIXES = ("python -m ", ".venv/bin/python -m ", "make ")


class Parsed(Exception):
    """Raised in place of running the command once its arguments parsed."""


def documented_commands() -> list[tuple[str, str]]:
    """(doc, command) for every `python -m` / `make` line in a fenced block; placeholders filled in."""
    found = []
    for doc in DOCS:
        for block in FENCE.findall(doc.read_text()):
            for raw in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s+#.*$", "", raw).strip().removeprefix("$ ")
                if not line.startswith(PREFIXES) or "..." in line or "…" in line:
                    continue
                line = line.split(" | ")[0].split(" && ")[0].split(" > ")[0]
                line = re.sub(r"<([^<>]+)>", lambda m: "v1" if m.group(1) == "tag" else "x", line)
                found.append((doc.name, line))
    return found


def _parse_only(module: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self: argparse.ArgumentParser, args: list[str] | None = None, namespace: object = None) -> None:
        real(self, args, namespace)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [module, *argv])
    with pytest.raises(Parsed):
        runpy.run_module(module, run_name="__main__", alter_sys=True)


COMMANDS = documented_commands()


def test_the_docs_show_commands() -> None:
    modules = {c.split()[2] for _, c in COMMANDS if " -m " in c}
    assert {"ops.preview", "ops.launch_training", "ops.jobs", "ops.teardown", "training"} <= modules


@pytest.mark.parametrize(("doc", "command"), COMMANDS, ids=[f"{d}:{c[:60]}" for d, c in COMMANDS])
def test_documented_command_parses(doc: str, command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    argv = shlex.split(command)
    if argv[0] == "make":
        proc = subprocess.run(["make", "-n", *argv[1:]], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, f"{doc}: `{command}`: {proc.stderr.strip()}"
        return
    module, args = argv[2], argv[3:]
    if module == "pytest":  # not ours to parse, and not inside this pytest
        return
    if "--cluster-name" in args:  # the sweep matches controller leftovers by the real cluster name
        stack = args[0]
        assert args[args.index("--cluster-name") + 1] == load_stack(stack).name_prefix, f"{doc}: `{command}`"
    try:
        _parse_only(module, args, monkeypatch)
    except SystemExit as exc:  # argparse: unknown flag, missing argument
        pytest.fail(f"{doc}: `{command}` does not parse (exit {exc.code})")
    except ModuleNotFoundError as exc:
        pytest.fail(f"{doc}: `{command}`: no module {exc.name}")


def test_a_renamed_flag_would_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit):
        _parse_only("ops.preview", ["dev", "--no-such-flag"], monkeypatch)


def test_docs_paths_exist() -> None:
    assert all(isinstance(d, Path) and d.exists() for d in DOCS)


def _make_n(*args: str) -> str:
    # Outside any calling make (`make test` runs this): a sub-make would add "make[1]: Leaving directory" lines.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
    proc = subprocess.run(
        ["make", "--no-print-directory", "-n", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()[-1].strip()


def test_make_test_shows_progress_and_durations_and_test_fast_leaves_out_the_real_model() -> None:
    full = _make_n("test")
    assert "console_output_style=progress" in full and "--durations=15" in full and "real_model" not in full
    fast = _make_n("test-fast")
    assert '-m "not real_model"' in fast or "-m 'not real_model'" in fast
    assert "real_model:" in (REPO_ROOT / "pyproject.toml").read_text()  # the marker the fast target deselects
    assert "make test\n" in (REPO_ROOT / ".ci" / "run").read_text()  # CI still runs everything
    assert _make_n("demo", "KEEP=1").endswith("-m ops.local_e2e --keep")
    assert _make_n("demo").endswith("-m ops.local_e2e")
