"""One JSON record per run: config, seed, versions, metrics, wall time. Tables are derived from records."""

from __future__ import annotations

import platform
import subprocess
import time
from pathlib import Path

from gramvl.io import write_json


def command_line(argv: list[str] | None = None) -> str:
    """The command that ran this script as a user would retype it (`python benchmarks/x.py ARGS`, each argument
    shell-quoted): the footer of every benchmark table and the `command` of its JSON record."""
    import shlex
    import sys

    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0])
    if script.is_absolute():
        try:
            script = script.relative_to(Path.cwd())
        except ValueError:
            pass
    return "python " + shlex.join([script.as_posix(), *argv[1:]])


def versions() -> dict:
    import open_clip
    import torch

    import gramvl

    return {"gramvl": gramvl.__version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
            "python": platform.python_version(), "git_commit": git_commit()}


def cpu_model() -> str:
    """The CPU's model name (results on the CPU depend on it in the last bits), or the platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """What a result depends on beyond its config: the versions, the CPU and the intra-op thread count (float
    sums, and so meta-trained artifacts, differ between CPUs and thread counts; docs/method.md)."""
    import torch

    return {**versions(), "threads": torch.get_num_threads(), "cpu": cpu_model()}


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:
        return None


def make_record(kind: str, config: dict, metrics: dict, seconds: float, **extra) -> dict:
    return {"kind": kind, "config": config, "metrics": metrics, "versions": versions(), "environment": environment(),
            "seconds": round(seconds, 3), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **extra}


def save_record(path: str | Path, record: dict) -> None:
    write_json(path, record)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"
