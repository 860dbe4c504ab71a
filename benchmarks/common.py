"""What every benchmark shares: a description of the machine, and writing results with their provenance."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__} with {torch.get_num_threads()} threads{gpu}"


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=RESULTS.parent, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command() -> str:
    """How this benchmark was started, as `python -m benchmarks.NAME ARGS`."""
    script = Path(sys.argv[0])
    name = f"benchmarks.{script.stem}" if script.suffix == ".py" else sys.argv[0]
    return " ".join(["python -m", name, *map(shlex.quote, sys.argv[1:])])


def provenance() -> dict:
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "commit": git_commit(),
        "command": command(),
    }


def write_results(name: str, record: dict, table_md: str, out_dir: Path = RESULTS) -> Path:
    """Save record (+ provenance) as NAME.json and a Markdown page NAME.md holding `table_md`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {**provenance(), **record}
    (out_dir / f"{name}.json").write_text(json.dumps(record, indent=2))
    md = (
        f"# {name}\n\n- date: {record['date']}\n- machine: {record['machine']}\n- commit: {record['commit']}\n"
        f"- command: `{record['command']}`\n\n{table_md}\n"
    )
    (out_dir / f"{name}.md").write_text(md)
    print(md)
    return out_dir / f"{name}.md"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
