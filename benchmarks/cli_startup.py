"""How fast `lime-hf` answers `--help` and usage errors, against a bare `python -c pass` (target: well under 1 s).

Every command runs as a fresh process, the commands interleaved round by round so that a busy moment of the
shared machine hits all of them alike; the table shows the median and the fastest run of each, and the median's
ratio to `python -c pass`. `import lime_hf` is timed too: a lazy package (`lime_hf/__init__.py`) that registers
"lime" with the Auto classes when transformers' are first imported, which the last row pays (torch and
transformers); `import_lime_hf_importtime_us` is `python -X importtime`'s own count for `import lime_hf`.

    python benchmarks/cli_startup.py --repeats 10
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import save_results

LIME_HF = shutil.which("lime-hf", path=str(Path(sys.executable).parent)) or "lime-hf"
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "lime-hf --help": [LIME_HF, "--help"],
    "lime-hf train --help": [LIME_HF, "train", "--help"],
    "lime-hf generate --help": [LIME_HF, "generate", "--help"],
    "lime-hf generate no/such/folder x (usage error)": [LIME_HF, "generate", "no/such/folder", "x"],
    "lime-hf train (usage error: no tokenizer)": [LIME_HF, "train", "corpus.txt"],
    "python -c 'import lime_hf'": [sys.executable, "-c", "import lime_hf"],
    "import lime_hf + AutoConfig (registers lime)": [
        sys.executable, "-c", "import lime_hf; from transformers import AutoConfig; AutoConfig.for_model('lime')",
    ],
}  # fmt: skip
IMPORTTIME = [sys.executable, "-X", "importtime", "-c", "import lime_hf"]


def importtime_us() -> int:
    """`-X importtime`'s cumulative microseconds for the top-level `lime_hf` import."""
    result = subprocess.run(IMPORTTIME, capture_output=True, text=True, check=True)
    line = next(line for line in reversed(result.stderr.splitlines()) if line.rstrip().endswith("| lime_hf"))
    return int(line.split("|")[1])


def time_once(command: list[str]) -> float:
    """Wall seconds of one run; the exit code must be 0 (help, import) or 2 (usage error)."""
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode not in (0, 2) or "Traceback" in result.stderr:
        raise RuntimeError(f"{command} failed ({result.returncode}):\n{result.stderr}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--repeats", type=int, default=10, help="rounds of every command (default: %(default)s)"
    )
    args = parser.parse_args()

    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    importtimes = []
    for command in COMMANDS.values():  # one warm-up round: page cache, .pyc files
        time_once(command)
    for _ in range(args.repeats):
        for name, command in COMMANDS.items():
            times[name].append(time_once(command))
        importtimes.append(importtime_us())

    baseline = statistics.median(times["python -c pass"])
    rows = [
        {
            "command": name,
            "median_ms": round(statistics.median(runs) * 1e3, 1),
            "min_ms": round(min(runs) * 1e3, 1),
            "median_over_python_pass": round(statistics.median(runs) / baseline, 2),
        }
        for name, runs in times.items()
    ]
    print(f"{'command':<50} {'median':>9} {'fastest':>9} {'/ python -c pass':>17}")
    for row in rows:
        print(
            f"{row['command']:<50} {row['median_ms']:>7.1f}ms {row['min_ms']:>7.1f}ms "
            f"{row['median_over_python_pass']:>16.2f}x"
        )
    print(f"python -X importtime -c 'import lime_hf': median {statistics.median(importtimes)} us")
    summary = {
        "repeats": args.repeats,
        "import_lime_hf_importtime_us": statistics.median(importtimes),
        "rows": rows,
        "runs_s": times,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "target": "lime-hf --help and usage errors well under 1 s",
    }
    save_results("cli_startup", summary, rows)


if __name__ == "__main__":
    main()
