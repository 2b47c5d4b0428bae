"""Stage `train`: every run of every experiment, one at a time or `--jobs N` subprocesses, each resumable."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from .addition import ADD_VARIANTS, run_add
from .harness import PRESETS, log, write_json
from .honest import HONEST_VARIANTS, honest_specs
from .language_models import LM_VARIANTS, run_lm
from .meta_tokens import meta_run_names, run_meta
from .self_tagging import SELF_TAGGING_VARIANTS, self_tagging_specs

# ------------------------------------------------------------------------------------------------- train


# `train --jobs N` starts each run as `reproduce.py run-one` in its own process.
SCRIPT = str(Path(__file__).resolve().parents[1] / "reproduce.py")


def run_names(preset: str, only: str | None = None) -> list[str]:
    """The runs of an experiment (`only`: "lm", "add", "meta" or "honest"), or of the LIME ones (lm and add) by
    default."""
    if only == "meta":  # its own stage, `reproduce.py meta`
        return meta_run_names(PRESETS[preset]["meta"])
    if only == "honest":  # its own stage, `reproduce.py honest`; the baseline and LIME are its references
        references = ("baseline", "lime", *HONEST_VARIANTS)
        return [f"lm-{v}-s{s}" for s in PRESETS[preset]["lm"]["seeds"] for v in references]
    names = []
    if only in (None, "lm"):
        variants = (*LM_VARIANTS, *SELF_TAGGING_VARIANTS)
        names += [f"lm-{v}-s{s}" for s in PRESETS[preset]["lm"]["seeds"] for v in variants]
    if only in (None, "add"):
        names += [f"add-{v}-s{s}" for s in PRESETS[preset]["add"]["seeds"] for v in ADD_VARIANTS]
    return names


def run_one(cache: Path, preset: str, name: str, threads: int | None = None) -> None:
    path = cache / "runs" / preset / f"{name}.json"
    if path.exists():
        log(f"{name}: done already ({path})")
        return
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    kind, variant, seed = re.fullmatch(r"(lm|add|meta)-(\w+)-s(\d+)", name).groups()
    if kind == "meta":
        result = run_meta(cache, preset, variant, int(seed), device, PRESETS[preset]["meta"])
    elif variant in HONEST_VARIANTS:
        spec = honest_specs(PRESETS[preset]["lm"]["layers"])[variant]
        result = run_lm(cache, preset, variant, int(seed), device, spec)
    elif variant in SELF_TAGGING_VARIANTS:
        fields = json.loads((cache / "data" / "meta.json").read_text())["lm"]["metadata_fields"]
        result = run_lm(cache, preset, variant, int(seed), device, self_tagging_specs(fields)[variant])
    else:
        runner = run_lm if kind == "lm" else run_add
        result = runner(cache, preset, variant, int(seed), device)
    write_json(path, result)
    log(f"{name}: finished in {result['wall_s']:.0f}s -> {path}")


def train(
    cache: Path, preset: str, jobs: int, only: str | None, runs: list[str] | None, threads: int | None = None
) -> None:
    names = runs or run_names(preset, only)
    pending = [n for n in names if not (cache / "runs" / preset / f"{n}.json").exists()]
    log(f"train: preset {preset}, {len(pending)} of {len(names)} runs to do, {jobs} at a time")
    if jobs <= 1:
        for name in pending:
            run_one(cache, preset, name, threads)
        return
    logs = cache / "logs" / preset
    logs.mkdir(parents=True, exist_ok=True)
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    running: list[tuple[str, subprocess.Popen]] = []
    failed = []
    queue = list(pending)
    while queue or running:
        while queue and len(running) < jobs:
            name = queue.pop(0)
            command = [sys.executable, SCRIPT, "run-one", "--run", name, "--preset", preset,
                       "--cache", str(cache), "--threads", str(threads)]  # fmt: skip
            with open(logs / f"{name}.log", "a") as handle:
                running.append((name, subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)))
        time.sleep(2)
        for item in list(running):
            if item[1].poll() is not None:
                running.remove(item)
                status = "ok" if item[1].returncode == 0 else f"FAILED ({item[1].returncode})"
                log(f"train: {item[0]} {status}")
                if item[1].returncode:
                    failed.append(item[0])
    if failed:
        raise SystemExit(f"runs failed: {failed}; see {logs}")
