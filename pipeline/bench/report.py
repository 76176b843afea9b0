"""Results on disk: ``benchmarks/results/<date>_<hardware>_<model>/`` holds, per mode, ``<mode>.json`` (every
figure, the resolved config, the machine, the command), ``<mode>.md`` (a table) and PNG plots; README.md in
the folder collects the exact commands and tables of every mode run into it."""

from __future__ import annotations

import datetime
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Any

# Columns of the markdown tables, per mode: (key, header, format)
COLUMNS: dict[str, list[tuple[str, str, str]]] = {
    "model": [("method", "method", "s"), ("engine", "engine", "s"), ("precision", "precision", "s"),
              ("world_size", "procs", "d"), ("batch_size", "batch/dev", "d"), ("image_size", "px", "d"),
              ("step_time_s", "step s", ".4f"), ("step_time_s_min", "min", ".4f"), ("step_time_s_max", "max", ".4f"),
              ("images_per_sec_per_device", "img/s/dev", ".1f"), ("images_per_sec", "img/s", ".1f"),
              ("flops_per_image", "GFLOP/img", "g9"), ("achieved_tflops_per_device", "TFLOP/s/dev", ".4g"),
              ("mfu", "MFU", "%"), ("peak_memory_gib", "peak GiB", ".2f"), ("data_wait_fraction", "data wait", "%")],
    "baseline": [("repeat", "repeat", "d"), ("side", "side", "s"), ("engine", "engine", "s"),
                 ("world_size", "procs", "d"), ("batch_size", "batch/dev", "d"), ("image_size", "px", "d"),
                 ("step_time_s", "step s", ".4f"), ("step_time_s_min", "min", ".4f"), ("step_time_s_max", "max", ".4f"),
                 ("images_per_sec_per_device", "img/s/dev", ".1f"), ("mfu", "MFU", "%"),
                 ("peak_memory_gib", "peak GiB", ".2f")],
    "e2e": [("backend", "backend", "s"), ("engine", "engine", "s"), ("world_size", "procs", "d"),
            ("batch_size", "batch/dev", "d"), ("image_size", "px", "d"), ("num_workers", "workers", "d"),
            ("step_time_s", "step s", ".4f"), ("images_per_sec_per_device", "img/s/dev", ".1f"),
            ("images_per_sec", "img/s", ".1f"), ("data_wait_fraction", "data wait", "%"),
            ("throughput_vs_synthetic", "vs synthetic", ".3f"), ("mfu", "MFU", "%"),
            ("peak_memory_gib", "peak GiB", ".2f"), ("error", "error", "s")],
    "memory": [("engine", "engine", "s"), ("precision", "precision", "s"), ("rank", "rank", "d"),
               ("params_bytes", "params MB", "MB"), ("master_bytes", "master MB", "MB"),
               ("grads_bytes", "grads MB", "MB"), ("optim_bytes", "optim MB", "MB"),
               ("buckets_bytes", "buckets MB", "MB"), ("other_bytes", "other MB", "MB"),
               ("params_vs_ddp", "params x DDP", ".3f"), ("grads_vs_ddp", "grads x DDP", ".3f"),
               ("optim_vs_ddp", "optim x DDP", ".3f"), ("state_vs_ddp", "state x DDP", ".3f"),
               ("rss_at_count_bytes", "RSS MB", "MB"), ("peak_rss_bytes", "peak RSS MB", "MB"),
               ("cuda_allocated_at_count_bytes", "CUDA MB", "MB"), ("cuda_peak_allocated_bytes", "CUDA peak MB", "MB")],
    "scaling_measured": [("world_size", "procs", "d"), ("batch_size", "batch/dev", "d"),
                         ("step_time_s", "step s", ".4f"), ("images_per_sec_per_device", "img/s/dev", ".1f"),
                         ("images_per_sec", "img/s", ".1f"), ("scaling_efficiency", "efficiency", "%")],
    "scaling": [("engine", "engine", "s"), ("local_loss", "local loss", "s"), ("nodes", "nodes", "d"),
                ("world_size", "GPUs", "d"), ("global_batch", "global batch", "d"),
                ("compute_time_s", "compute s", ".4f"), ("comm_time_s", "comm s", ".4f"),
                ("exposed_comm_s", "exposed s", ".4f"), ("step_time_s", "step s", ".4f"),
                ("bytes_per_rank", "MB/rank/step", "MB"), ("loss_logits_gib", "logits GiB", ".2f"),
                ("scaling_efficiency", "efficiency", "%")],
}


def results_dir(root: str | Path, hardware: str, model: str, date: str | None = None) -> Path:
    date = date or datetime.date.today().isoformat()
    return Path(root) / f"{date}_{hardware}_{model.replace('/', '-')}"


def command_line(argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return "pipeline " + " ".join(shlex.quote(a) for a in args)


def _fmt(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if fmt == "s":
        return str(value)
    if fmt == "%":
        return f"{100 * value:.1f}%"
    if fmt == "MB":
        return f"{value / 1e6:.1f}"
    if fmt == "g9":
        return f"{value / 1e9:.4g}"
    return format(value, fmt)


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    cols = [c for c in columns if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k), f) for k, _, f in cols) + " |")
    return "\n".join(lines)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def write_mode(out_dir: Path, mode: str, payload: dict[str, Any], tables: dict[str, str], plots: list[str],
               notes: str = "") -> Path:
    """Write ``<mode>.json`` and ``<mode>.md`` and add this run's section to the folder's README.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{mode}.json").write_text(json.dumps(payload, indent=1, default=_json_default) + "\n")
    env = payload.get("environment", {})
    body = [f"## `{mode}`", "", "```", payload["command"], "```", "",
            (f"{env.get('date', '')} on {env.get('hardware', '?')}, {env.get('world_size', 1)} process(es), "
             f"torch {env.get('torch', '?')}, commit {str(env.get('git_commit') or '?')[:10]}."), ""]
    if notes:
        body += [notes, ""]
    for title, table in tables.items():
        body += ([f"**{title}**", ""] if title else []) + [table, ""]
    body += [f"![{p}]({p})" for p in plots] + [""]
    section = "\n".join(body)
    (out_dir / f"{mode}.md").write_text(section)
    readme = out_dir / "README.md"
    head = (f"# Benchmark results: {out_dir.name}\n\nWritten by `pipeline bench`; every figure is in the "
            f"`<mode>.json` files next to this one, with the resolved config and the machine.\n\n")
    text = readme.read_text() if readme.exists() else head
    marker = f"<!-- {mode} -->"
    if marker in text:  # a re-run of a mode replaces its section
        pre, rest = text.split(marker, 1)
        post = rest.split("<!-- end -->", 1)[1] if "<!-- end -->" in rest else ""
        text = pre + marker + "\n" + section + "<!-- end -->" + post
    else:
        text = text.rstrip() + "\n\n" + marker + "\n" + section + "<!-- end -->\n"
    readme.write_text(text)
    return out_dir / f"{mode}.json"


# ---------------------------------------------------------------------------------------------------------------
# Plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_model(rows: list[dict[str, Any]], path: Path) -> None:
    """Images/sec per device and MFU (achieved TFLOP/s where no peak is known) vs batch size, a line per
    image size."""
    plt = _plt()
    ok = [r for r in rows if "error" not in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    use_mfu = all(r.get("mfu") is not None for r in ok)
    for size in sorted({r["image_size"] for r in ok}):
        pts = sorted((r for r in ok if r["image_size"] == size), key=lambda r: r["batch_size"])
        x = [r["batch_size"] for r in pts]
        ips = [r["images_per_sec_per_device"] for r in pts]
        fast = [r["images_per_sec_per_device"] * r["step_time_s"] / r["step_time_s_min"] for r in pts]
        slow = [r["images_per_sec_per_device"] * r["step_time_s"] / r["step_time_s_max"] for r in pts]
        a.errorbar(x, ips, yerr=[[i - s for i, s in zip(ips, slow)], [f - i for i, f in zip(ips, fast)]],
                   marker="o", capsize=3, label=f"{size} px")
        b.plot(x, [100 * r["mfu"] if use_mfu else r["achieved_tflops_per_device"] for r in pts], marker="o",
               label=f"{size} px")
    title = f"{ok[0]['method']} {ok[0]['model']} ({ok[0]['engine']}, {ok[0]['precision']})" if ok else ""
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size per device")
        ax.grid(alpha=0.3)
        ax.legend()
    a.set_ylabel("images/sec per device")
    b.set_ylabel("MFU (%)" if use_mfu else "achieved TFLOP/s per device")
    fig.suptitle(f"{title} on {ok[0]['device'] if ok else '?'}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_scaling(pred: list[dict[str, Any]], measured: list[dict[str, Any]], path: Path, title: str) -> None:
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for key in dict.fromkeys((r["engine"], r["local_loss"]) for r in pred):
        pts = [r for r in pred if (r["engine"], r["local_loss"]) == key]
        label = f"{key[0]}, {'local' if key[1] else 'full'} loss"
        a.plot([r["world_size"] for r in pts], [100 * r["scaling_efficiency"] for r in pts], marker="o", label=label)
        b.plot([r["world_size"] for r in pts], [r["world_size"] * r["images_per_sec_per_device"] for r in pts],
               marker="o", label=label)
    if measured:
        a.plot([r["world_size"] for r in measured], [100 * r["scaling_efficiency"] for r in measured], "k*",
               markersize=12, label="measured here")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("GPUs (1, then nodes x GPUs per node)")
        ax.grid(alpha=0.3)
    a.set_ylabel("predicted scaling efficiency (%)")
    a.set_ylim(0, 105)
    b.set_yscale("log")
    b.set_ylabel("predicted images/sec (total)")
    a.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_baseline(rows: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for side, color in (("ours", "C0"), ("bare", "C1")):
        pts = [r for r in rows if r["side"] == side]
        ax.errorbar([r["repeat"] for r in pts], [r["step_time_s"] for r in pts],
                    yerr=[[r["step_time_s"] - r["step_time_s_min"] for r in pts],
                          [r["step_time_s_max"] - r["step_time_s"] for r in pts]],
                    fmt="o", color=color, capsize=3, label="trainer (ours)" if side == "ours" else "bare loop")
    ax.set_xlabel("repeat (alternating order)")
    ax.set_ylabel("seconds per step (bars: log-window spread)")
    ax.set_title(f"overhead ratio {summary['overhead_ratio']:.3f} "
                 f"(min {summary['overhead_ratio_min']:.3f}, max {summary['overhead_ratio_max']:.3f})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_bars(rows: list[dict[str, Any]], label_key: str, path: Path, title: str,
              second: tuple[str, str] | None = None) -> None:
    """Images/sec per row (e2e backends, loader backends), optionally a second metric beside it."""
    plt = _plt()
    ok = [r for r in rows if "error" not in r]
    n = 2 if second else 1
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4), squeeze=False)
    labels = [str(r.get(label_key)) for r in ok]
    ips = [r.get("images_per_sec", r.get("images_per_sec_per_device", 0)) for r in ok]
    axes[0][0].bar(labels, ips, color="C0")
    axes[0][0].set_ylabel("images/sec")
    if second:
        key, ylabel = second
        axes[0][1].bar(labels, [100 * (r.get(key) or 0) for r in ok], color="C3")
        axes[0][1].set_ylabel(ylabel)
    for ax in axes[0]:
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
