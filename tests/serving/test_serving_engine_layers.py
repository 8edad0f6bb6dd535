"""The engine half of `serving/` (batching, scheduling, decode, prefix cache, quantization, sampling, CPU threads)
imports only the standard library, torch, transformers, `facts` and the engine's own modules: never the API half
(FastAPI app, handlers, protocol, auth, limits, metrics, config), so the engine can be driven, tested and benchmarked
without a server, and the API depends on the engine, not the other way round (issue 20)."""

from __future__ import annotations

import ast
import sys

import pytest

from tests.helpers import REPO_ROOT

ENGINE = {
    "serving.batching",
    "serving.scheduler",
    "serving.decode",
    "serving.prefix_cache",
    "serving.sampling",
    "serving.threads",
    "serving.grammar",
}
# quantize.py reads `check_quantization` (which methods each engine takes) from config: the one API module the
# engine may name, for that one table
ALLOWED_API = {"serving.quantize": {"serving.config"}}
ENGINE_ALL = ENGINE | {"serving.quantize"}
THIRD_PARTY = {"torch", "transformers", "torchao", "llguidance", "numpy"}


def _imports(module: str) -> set[str]:
    path = REPO_ROOT.joinpath(*module.split(".")).with_suffix(".py")
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize("module", sorted(ENGINE_ALL))
def test_engine_modules_import_only_the_engine_torch_and_facts(module: str) -> None:
    wrong = []
    for name in _imports(module):
        top = name.split(".")[0]
        if top in sys.stdlib_module_names or top in {"__future__", "facts"} or top in THIRD_PARTY:
            continue
        if name in ENGINE_ALL or name in ALLOWED_API.get(module, set()):
            continue
        wrong.append(name)
    assert not wrong, f"{module} imports {sorted(wrong)}"


def test_no_import_cycle_between_decode_and_the_prefix_cache() -> None:
    """The prefix cache is a store the Decoder uses; it never calls (or imports) the decoder."""
    assert not {m for m in _imports("serving.prefix_cache") if m.startswith("serving")}
    assert "serving.prefix_cache" in _imports("serving.decode")
