"""Collect what the GPU run has measured so far into ``README.md`` and ``summary.json`` of its results folder:
the machine and commit, each stage's exit status and time, the targets of issue #16 against the figures, the
test outcomes and every benchmark's command and table. Runs after every stage, so a run cut short still leaves
a complete summary of the stages it finished.

    python benchmarks/gpu/summarize.py RESULTS_DIR
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

MFU_TARGET, LOADER_TARGET, WAIT_TARGET = 0.45, 3.0, 0.03


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def read_pytest(res: Path) -> dict[str, Any] | None:
    """Counts and failures from pytest's JUnit XML."""
    try:
        root = ET.parse(res / "pytest.xml").getroot()
    except (OSError, ET.ParseError):
        return None
    out: dict[str, Any] = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "skips": []}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        kind = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        if kind is None:
            out["passed"] += 1
        elif kind.tag == "skipped":
            out["skipped"] += 1
            out["skips"].append(f"{name}: {(kind.get('message') or '')[:160]}")
        else:
            out["failed" if kind.tag == "failure" else "errors"] += 1
            out["failures"].append(f"{name}: {(kind.get('message') or '').splitlines()[0][:300] if kind.get('message') else kind.tag}")
    return out


def model_rows(res: Path) -> list[tuple[str, dict]]:
    out = []
    for path in sorted(res.glob("model_*/model.json"), key=lambda p: (p.parent.name != "model_eager", p)):
        payload = _load(path)
        if payload:
            out.append((path.parent.name, payload))
    return out


def targets(model: list[tuple[str, dict]], loader: dict | None, e2e: dict | None, tests: dict | None,
            smoke: bool) -> list[dict[str, Any]]:
    rows = []
    best = None
    for _, payload in model:
        for r in payload.get("results", []):
            if r.get("mfu") is not None and r.get("precision") == "bf16" and (best is None or r["mfu"] > best["mfu"]):
                best = r
    rows.append({"target": f"MFU >= {MFU_TARGET:.0%} (ViT-B/16 SimCLR, bf16, 224 px)",
                 "measured": (f"{_pct(best['mfu'])} (compile={best['compile']}, batch {best['batch_size']}, "
                              f"{best['images_per_sec_per_device']:.0f} img/s)") if best else "not measured",
                 "met": None if best is None else best["mfu"] >= MFU_TARGET})
    ratio = None
    if loader:
        rates = {r["backend"]: r["images_per_sec"] for r in loader.get("results", [])}
        if rates.get("dali") and rates.get("torch"):
            ratio = rates["dali"] / rates["torch"]
    rows.append({"target": f"DALI mixed decode >= {LOADER_TARGET:g}x the torch backend (img/s, two 224 px views)",
                 "measured": f"{ratio:.2f}x" if ratio is not None else "not measured",
                 "met": None if ratio is None else ratio >= LOADER_TARGET})
    wait = None
    if e2e:
        wait = next((r.get("data_wait_fraction") for r in e2e.get("results", [])
                     if r.get("backend") == "dali" and "error" not in r), None)
    rows.append({"target": f"end-to-end data wait < {WAIT_TARGET:.0%} of step time (ViT-S/16 SimCLR, DALI)",
                 "measured": _pct(wait) if wait is not None else "not measured",
                 "met": None if wait is None else wait < WAIT_TARGET})
    ran = tests is not None and tests["passed"] + tests["failed"] + tests["errors"] > 0
    rows.append({"target": "every `pytest -m gpu` test passes",
                 "measured": (f"{tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
                              f"{tests['skipped']} skipped") if tests else "not run",
                 "met": None if not ran else tests["failed"] + tests["errors"] == 0})
    if smoke:
        for r in rows:
            r["met"] = None  # a CPU rehearsal measures nothing
    return rows


def summarize(res: Path) -> dict[str, Any]:
    env = _load(res / "env.json") or {}
    stages = [json.loads(line) for line in (res / "stages.jsonl").read_text().splitlines() if line.strip()] \
        if (res / "stages.jsonl").exists() else []
    tests = read_pytest(res)
    model = model_rows(res)
    loader = _load(res / "loader" / "loader.json")
    e2e = _load(res / "e2e" / "e2e.json")
    smoke = bool(env.get("smoke"))
    goals = targets(model, loader, e2e, tests, smoke)
    gpu = env.get("gpu") or ("CPU rehearsal (GPU_SMOKE=1)" if smoke else "unknown GPU")
    pk = env.get("packages", {})
    lines = [f"# GPU run: {gpu}, {env.get('date', '')[:10]}", ""]
    if smoke:
        lines += ["**CPU rehearsal (`GPU_SMOKE=1`): tiny sizes, nothing here is a measurement.**", ""]
    smi = env.get("nvidia_smi") or {}
    lines += [
        (f"Commit `{env.get('commit', 'unknown')}`; torch {pk.get('torch', '?')} (CUDA {env.get('torch_cuda')}), "
        f"Python {env.get('python', '?')}, timm {pk.get('timm', '?')}, DALI {pk.get('nvidia.dali', '?')}, "
        f"DeepSpeed {pk.get('deepspeed', '?')}; driver {smi.get('driver', '-')}; {env.get('cpu_count', '?')} CPU "
        f"cores. A bf16 8192^3 matmul ran at {_num(env.get('matmul_bf16_tflops'))} TFLOP/s here (datasheet dense "
        f"bf16 peak {_num(env.get('datasheet_bf16_tflops'), '.0f')}, the MFU denominator)."),
        "",
        "Made by `bash benchmarks/gpu/run.sh` (see `benchmarks/gpu/README.md`); every command is below.",
        "",
        "## Targets (issue #16)", "", "| target | measured | met |", "| --- | --- | --- |",
    ]
    for g in goals:
        lines.append(f"| {g['target']} | {g['measured']} | {'-' if g['met'] is None else ('yes' if g['met'] else 'no')} |")
    lines += ["", "## Stages", "", "| stage | exit | seconds | budget s | command |", "| --- | --- | --- | --- | --- |"]
    for s in stages:
        rc = {0: "0", 124: "124 (time budget)", 137: "137 (killed)"}.get(s["rc"], str(s["rc"]))
        lines.append(f"| {s['stage']} | {rc} | {s['seconds']} | {s.get('budget_s', '-')} | `{s.get('command', '')}` |")
    if env.get("problems"):
        lines += ["", "Stage 0 found: " + "; ".join(env["problems"])]
    lines += ["", "## Tests: `pytest -m gpu`", ""]
    if tests:
        lines.append(f"{tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
                     f"{tests['skipped']} skipped (full output: pytest.txt).")
        lines += [f"- FAILED {f}" for f in tests["failures"]]
        lines += [f"- skipped {s}" for s in tests["skips"][:20]]
    else:
        lines.append("not run")
    lines += ["", "## Model step: `pipeline bench model`", ""]
    if model:
        lines += ["| run | compile | batch | px | img/s | step s (min-max) | TFLOP/s | MFU | peak GiB |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, payload in model:
            for r in payload.get("results", []):
                if "error" in r:
                    lines.append(f"| {name} | - | {r.get('batch_size')} | {r.get('image_size')} | {r['error']} |"
                                 " | | | |")
                    continue
                lines.append(
                    f"| {name} | {r['compile']} | {r['batch_size']} | {r['image_size']} | "
                    f"{r['images_per_sec_per_device']:.1f} | {r['step_time_s']:.4f} ({r['step_time_s_min']:.4f}-"
                    f"{r['step_time_s_max']:.4f}) | {r['achieved_tflops_per_device']:.1f} | {_pct(r.get('mfu'))} | "
                    f"{_num(r.get('peak_memory_gib'), '.2f')} |")
        lines.append("")
        lines += [f"- {name}: `{payload.get('command')}`" for name, payload in model]
    else:
        lines.append("not run")
    lines += ["", "## Loader: `pipeline bench loader`", ""]
    if loader:
        lines += [f"`{loader['meta']['command']}`", "", "| backend | decode | device | cores | batch | images/sec |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['backend']} | {r.get('decode', '-')} | {r['device']} | {r['cpu_cores']} | {r['batch_size']} | "
                  f"{r['images_per_sec']:.1f} (runs {r.get('runs_images_per_sec')}) |" for r in loader["results"]]
    else:
        lines.append("not run")
    lines += ["", "## End to end: `pipeline bench e2e`", ""]
    if e2e:
        lines += [f"`{e2e.get('command')}`", "", "| backend | batch | step s | img/s | data wait | vs synthetic | MFU |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in e2e.get("results", []):
            if "error" in r:
                lines.append(f"| {r['backend']} | {r.get('batch_size')} | {r['error']} | | | | |")
                continue
            lines.append(f"| {r['backend']} | {r['batch_size']} | {r['step_time_s']:.4f} | "
                         f"{r['images_per_sec_per_device']:.1f} | {_pct(r.get('data_wait_fraction'))} | "
                         f"{_num(r.get('throughput_vs_synthetic'), '.3f')} | {_pct(r.get('mfu'))} |")
    else:
        lines.append("not run")
    text = "\n".join(lines) + "\n"
    (res / "README.md").write_text(text)
    summary = {"gpu": gpu, "commit": env.get("commit"), "smoke": smoke, "targets": goals, "stages": stages,
               "tests": tests, "env": env}
    (res / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    summarize(Path(sys.argv[1]))
