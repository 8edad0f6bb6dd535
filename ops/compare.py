"""Compare two `ops.preview --json` reports (base branch vs head) as markdown for a PR comment.

    python -m ops.preview dev --json > base.json      # on the base branch
    python -m ops.preview dev --json > head.json      # on yours
    python -m ops.compare base.json head.json         # or: python -m ops.preview dev --compare base.json

Resources are identified by type + name; a resource whose inputs differ is "changed" and each changed top-level
input is listed with its old and new value. Policy verdicts are compared by (rule, resource, message); cost by the
idle and peak totals. Reports of two different stacks are compared with a warning on top.
Exit status: 0 compared, 2 usage (a missing or unreadable file, not a preview report).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

VALUE_WIDTH = 60

Key = tuple[str, str]


def _resources(report: Mapping[str, Any]) -> dict[Key, Mapping[str, Any]]:
    return {(r["type"], r["name"]): r for r in report.get("resources", [])}


def _changed_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    a, b = old.get("inputs") or {}, new.get("inputs") or {}
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    keys += [opt for opt in ("protect", "retain_on_delete", "parent") if old.get(opt) != new.get(opt)]
    return keys


def _violations(report: Mapping[str, Any]) -> set[tuple[str, str, str, str]]:
    found = set()
    for rule in (report.get("policy") or {}).get("rules", []):
        for v in rule["violations"]:
            found.add((rule["level"], rule["name"], v.get("resource_name") or "(stack)", v["message"]))
    return found


def _money(value: float | None) -> str:
    return "unknown" if value is None else f"${value:,.2f}"


def _value(value: Any) -> str:
    text = "(none)" if value is None else json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)
    return text if len(text) <= VALUE_WIDTH else text[: VALUE_WIDTH - 1] + "…"


def _old_new(old: Mapping[str, Any], new: Mapping[str, Any], key: str) -> str:
    """`key`: old → new, for an input or a resource option."""
    if key in ("protect", "retain_on_delete", "parent"):
        a, b = old.get(key), new.get(key)
    else:
        a, b = (old.get("inputs") or {}).get(key), (new.get("inputs") or {}).get(key)
    return f"`{key}`: `{_value(a)}` → `{_value(b)}`"


def _delta(value: float) -> str:
    return f"{'+' if value >= 0 else '-'}${abs(value):,.2f}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def compare(base: Mapping[str, Any], head: Mapping[str, Any]) -> dict[str, Any]:
    """The differences as data (what `compare_markdown` renders)."""
    old, new = _resources(base), _resources(head)
    added = sorted(k for k in new if k not in old)
    removed = sorted(k for k in old if k not in new)
    changed = {k: _changed_keys(old[k], new[k]) for k in sorted(set(old) & set(new))}
    changed = {k: v for k, v in changed.items() if v}
    vb, vh = _violations(base), _violations(head)
    cost_b, cost_h = base.get("cost") or {}, head.get("cost") or {}
    return {
        "added": added,
        "removed": removed,
        "changed": changed,
        "new_violations": sorted(vh - vb),
        "resolved_violations": sorted(vb - vh),
        "idle": (cost_b.get("idle_monthly", 0.0), cost_h.get("idle_monthly", 0.0)),
        "peak": (cost_b.get("peak_monthly", 0.0), cost_h.get("peak_monthly", 0.0)),
        "stacks": (base.get("stack"), head.get("stack")),
        "passed": (head.get("policy") or {}).get("passed", True),
        "cost_items": _cost_item_changes(cost_b, cost_h),
    }


def _cost_item_changes(base: Mapping[str, Any], head: Mapping[str, Any]) -> list[tuple[str, str, float, float]]:
    def totals(cost: Mapping[str, Any]) -> dict[tuple[str, str], tuple[float, float]]:
        return {(i["resource"], i["item"]): (i["idle_monthly"], i["peak_monthly"]) for i in cost.get("items", [])}

    b, h = totals(base), totals(head)
    rows = []
    for key in sorted(set(b) | set(h)):
        (bi, bp), (hi, hp) = b.get(key, (0.0, 0.0)), h.get(key, (0.0, 0.0))
        if (bi, bp) != (hi, hp):
            rows.append((key[0], key[1], round(hi - bi, 2), round(hp - bp, 2)))
    return rows


def compare_markdown(base: Mapping[str, Any], head: Mapping[str, Any]) -> str:
    d = compare(base, head)
    stack = head.get("stack", "?")
    new_v = [v for v in d["new_violations"]]
    mandatory_new = [v for v in new_v if v[0] == "mandatory"]
    if mandatory_new:
        policy = f"{len(mandatory_new)} new mandatory violation(s)"
    elif new_v:
        policy = f"{len(new_v)} new advisory violation(s)"
    else:
        policy = "no new violations"
    if d["resolved_violations"]:
        policy += f", {len(d['resolved_violations'])} resolved"
    if not d["passed"]:
        policy += " (head FAILS mandatory policy)"
    (ib, ih), (pb, ph) = d["idle"], d["peak"]
    known = None not in (ib, ih, pb, ph)
    cost = (
        f"idle {_money(ib)} → {_money(ih)} ({_delta(ih - ib)}/mo), peak {_money(pb)} → {_money(ph)} "
        f"({_delta(ph - pb)}/mo)"
        if known
        else f"idle {_money(ib)} → {_money(ih)}, peak {_money(pb)} → {_money(ph)} (no prices for a region)"
    )
    lines = [f"### `{stack}`", ""]
    base_stack, head_stack = d["stacks"]
    if base_stack and head_stack and base_stack != head_stack:
        lines += [
            f"> **Warning:** comparing stack `{head_stack}` against a base report of stack `{base_stack}`: the "
            "differences below include everything the two stacks' configs differ in, not only this change.",
            "",
        ]
    lines.append(
        f"**{stack}: +{len(d['added'])} ~{len(d['changed'])} -{len(d['removed'])} resources, policy: {policy}, "
        f"cost: {cost}**"
    )
    if d["added"] or d["removed"] or d["changed"]:
        old, new = _resources(base), _resources(head)
        lines += ["", "| | type | name | changed inputs (old → new) |", "|---|---|---|---|"]
        lines += [f"| + | `{t}` | `{n}` | |" for t, n in d["added"]]
        lines += [f"| - | `{t}` | `{n}` | |" for t, n in d["removed"]]
        lines += [
            f"| ~ | `{t}` | `{n}` | {_cell('; '.join(_old_new(old[(t, n)], new[(t, n)], k) for k in keys))} |"
            for (t, n), keys in d["changed"].items()
        ]
    else:
        lines += ["", "No resource changes."]
    if d["new_violations"] or d["resolved_violations"]:
        lines += [
            "",
            "**Policy verdict changes**",
            "",
            "| | level | rule | resource | message |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| new | {lv} | `{r}` | `{n}` | {_cell(m)} |" for lv, r, n, m in d["new_violations"]]
        lines += [f"| resolved | {lv} | `{r}` | `{n}` | {_cell(m)} |" for lv, r, n, m in d["resolved_violations"]]
    if d["cost_items"] and known:
        lines += ["", "**Monthly cost delta**", "", "| resource | item | idle | peak |", "|---|---|---:|---:|"]
        lines += [f"| `{r}` | {_cell(i)} | {_delta(di)} | {_delta(dp)} |" for r, i, di, dp in d["cost_items"]]
        lines += [f"| **total** | | **{_delta(ih - ib)}** | **{_delta(ph - pb)}** |"]
    return "\n".join(lines)


def _report(path: str) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ValueError(f"{path} is not JSON ({exc})") from None
    if not isinstance(doc, dict) or "resources" not in doc or "stack" not in doc:
        raise ValueError(f"{path} is not an `ops.preview STACK --json` report (no 'stack' and 'resources')")
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.compare", description=__doc__.splitlines()[0])
    parser.add_argument("base", help="the base report: `python -m ops.preview STACK --json > base.json`")
    parser.add_argument("head", help="the head report, the same way")
    args = parser.parse_args(argv)
    try:
        base, head = _report(args.base), _report(args.head)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(compare_markdown(base, head))
    return 0


if __name__ == "__main__":
    sys.exit(main())
