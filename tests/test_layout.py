"""The tree tells what runs where (README, "Layout"): each package imports only the layers below it, the images
copy exactly the packages their code imports, and no module reaches into another's private names."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

from tests.helpers import CONTAINERS_DIR, REPO_ROOT

OURS = {"facts", "infra", "policy", "ops", "training", "serving", "tests", "bench"}
ALLOWED = {
    # facts: shared names and numbers, importable anywhere (no Pulumi, AWS or torch).
    "facts": {"facts"},
    # infra: the program `pulumi up` executes.
    "infra": {"infra", "facts"},
    # policy: the policy pack, run by `pulumi preview --policy-pack` (it reads the stack config as the program does).
    "policy": {"policy", "infra", "facts"},
    # the two images
    "training": {"training", "facts"},
    "serving": {"serving", "facts"},
    # operator tools drive all of the above; nothing deployed imports them.
    "ops": {"ops", "infra", "policy", "facts", "training", "serving"},
}
IMAGES = {
    "training.Dockerfile": {"training", "facts"},
    "serving.Dockerfile": {"serving", "facts"},
    "serving-cuda.Dockerfile": {"serving", "facts"},
    "serving-vllm.Dockerfile": {"serving", "facts"},
}


def _modules(package: str) -> list[Path]:
    return sorted((REPO_ROOT / package).rglob("*.py"))


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) for every import in the file, at any depth (late imports count)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_package_imports_only_the_layers_it_may(package: str) -> None:
    wrong = [
        f"{path.relative_to(REPO_ROOT)} imports {module}"
        for path in _modules(package)
        for module, _ in _imports(path)
        if module.split(".")[0] in OURS and module.split(".")[0] not in ALLOWED[package]
    ]
    assert not wrong, "\n".join(wrong)


def test_facts_needs_nothing_but_the_standard_library() -> None:
    third_party = [
        f"{path.relative_to(REPO_ROOT)} imports {module}"
        for path in _modules("facts")
        for module, _ in _imports(path)
        if module.split(".")[0] not in sys.stdlib_module_names | {"__future__", "facts"}
    ]
    assert not third_party, "\n".join(third_party)


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_each_image_copies_exactly_the_packages_its_code_imports(dockerfile: str) -> None:
    text = (CONTAINERS_DIR / dockerfile).read_text()
    copied = {m.group(1) for m in re.finditer(r"^COPY (?:--\S+ )*(\w+)/ /app/\1/$", text, re.M)}
    assert copied == IMAGES[dockerfile]
    # ... and what they copy needs nothing outside the image.
    for package in copied:
        assert ALLOWED[package] <= copied, f"{package} may import {ALLOWED[package] - copied}, not in {dockerfile}"


def test_no_module_imports_another_modules_private_names() -> None:
    reaching = [
        f"{path.relative_to(REPO_ROOT)}: from {module} import {name}"
        for package in sorted(OURS)
        for path in _modules(package)
        for module, names in _imports(path)
        if module.split(".")[0] in OURS
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not reaching, "\n".join(reaching)


def test_shared_facts_are_imported_from_facts_not_through_another_module() -> None:
    """A name `facts` defines is read from there, so the tree shows where it lives and a rename fails at import."""
    defined_by_facts: dict[Path, set[str]] = {}
    for package in sorted(OURS - {"facts"}):
        for path in _modules(package):
            defined_by_facts[path] = {
                alias.asname or alias.name
                for node in ast.parse(path.read_text()).body
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "facts"
                for alias in node.names
            }
    relayed = [
        f"{path.relative_to(REPO_ROOT)}: from {module} import {name} (it comes from facts)"
        for path in defined_by_facts
        for module, names in _imports(path)
        if module.split(".")[0] in OURS - {"facts"}
        for name in names
        if name in defined_by_facts.get(REPO_ROOT.joinpath(*module.split(".")).with_suffix(".py"), set())
    ]
    assert not relayed, "\n".join(relayed)
