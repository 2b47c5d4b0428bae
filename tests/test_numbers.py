"""Every number the README and the results pages quote comes from a committed results file under
benchmarks/results/ (written by a script in benchmarks/).

* The Benchmarks table and the table of meta-attention runs are rebuilt from the files by the scripts that print
  them, and must equal the page's.
* Every other number in a table or the prose of the results pages is looked up among the numbers of the results
  files (as written there, in percent, or in thousands / millions), at the precision it is quoted with.
  Numbers that are not results (sizes of the setup, goals, counts of things) are listed in SETUP with why.
"""

import contextlib
import csv
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"
sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmarks import their helpers as top-level modules

import meta_attention_runs  # noqa: E402
from reproduction.report import benchmarks_table  # noqa: E402

RESULT_PAGES = [
    ROOT / "README.md",
    *(DOCS / f"{name}.md" for name in ("benchmarks", "reproduction", "demo", "scale")),
]
# A number: 1,234 / 12.5 / 1.12e+04, not part of a word, a version, a file name or an issue number.
NUMBER = re.compile(r"(?<![\w.#/$+-])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(e[+-]\d+)?(?![\w/]|\.\d)")
SETUP_WORDS = re.compile(
    r"(arXiv|\d+B\b|torch|transformers|accelerate|datasets|tokenizers|peft|trl|lm-eval|datatrove|\bray\b|Python|python|ebook|#\d|steps? \d|\d+ steps|\d+ seeds?|seed \d|layers?"
    r"|hidden size|tokens? of|batch|x \d|\d x|k = |`|\bstride\b|\d+ (?:new )?positions|every \d+)"
)


def result_numbers(patterns: tuple[str, ...]) -> list[float]:
    """Every number of the JSON and CSV files under benchmarks/results/ that match `patterns`."""
    numbers: list[float] = []

    def walk(value) -> None:
        if isinstance(value, bool):
            return
        if isinstance(value, (int, float)):
            numbers.append(float(value))
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    for path in sorted({path for pattern in patterns for path in RESULTS.glob(pattern)}):
        if path.suffix == ".json":
            walk(json.loads(path.read_text(encoding="utf-8")))
        elif path.suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as handle:
                for row in csv.reader(handle):
                    for cell in row:
                        with contextlib.suppress(ValueError):
                            numbers.append(float(cell))
    return numbers


# The results files each page quotes. Not reproduce_runs.json, reproduce_curves.csv and meta_tokens.csv: their
# thousands of numbers (every point of every curve) would back almost any number.
HEADLINES = tuple(
    path.relative_to(RESULTS).as_posix()
    for path in RESULTS.rglob("*.*")
    if path.name
    not in {"reproduce_runs.json", "reproduce_honest_runs.json", "reproduce_curves.csv", "meta_tokens.csv"}
)
SOURCES = {
    "README.md": HEADLINES,
    "benchmarks.md": HEADLINES,
    "reproduction.md": (
        *("reproduce.json", "reproduce_cloze.json", "reproduce_addition.csv", "reproduce_generation.csv"),
        *("meta_tokens.json", "meta_attention*.json", "meta_attention_runs/*.json", "tag_heads.json"),
        *("reproduce_honest.json", "reproduce_honest_validation.json", "honest_pilot.json"),
        "reproduce_cloze_items.json",
    ),
    "demo.md": ("demo*",),
    "scale.md": ("datatrove_annotation*", "pack_throughput*", "streaming*"),
}


def backed(quoted: str, numbers: list[float], scales=(1, 100, 1e-3, 1e-6)) -> bool:
    """Whether one of `numbers`, as is, in percent, in thousands or in millions, rounds to `quoted` as written."""
    _, fraction, exponent = NUMBER.fullmatch(quoted).groups()
    value = float(quoted.replace(",", ""))
    digits = len(fraction) - 1 if fraction else 0
    step = 10 ** ((int(exponent[1:]) if exponent else 0) - digits)  # 1.494e+04: the last digit written
    return any(abs(number * scale - value) <= step / 2 + 1e-9 for number in numbers for scale in scales)


def text_of(page: Path) -> str:
    """The page without code blocks, inline code, link targets (file names, commands, anchors) and the two
    tables that the tests below rebuild whole."""
    text = page.read_text(encoding="utf-8")
    for table in (benchmarks_table(), meta_attention_runs.table()):
        text = text.replace(table.replace("\n", "\n  "), "").replace(table, "")
    text = re.sub(r"^```.*?^```$", "", text, flags=re.DOTALL | re.MULTILINE)
    text = re.sub(r"`[^`]*`", "", text)
    return re.sub(r"\]\([^)]*\)", "]", text)


def quoted_numbers(page: Path) -> list[tuple[str, str]]:
    """(number, the line it is on) for every number of the page but the setup's sizes: in a table, every cell
    but the row's label; in prose, every number without a SETUP_WORDS word nearby."""
    found = []
    for line in text_of(page).splitlines():
        line = re.sub(r"^\s*\d+\. ", "", line.strip())  # a numbered list's marker
        if line.startswith("|"):
            if not re.fullmatch(r"[|\s:-]+", line):
                found += [(match.group(0), line) for match in NUMBER.finditer(line.split("|", 2)[2])]
            continue
        for match in NUMBER.finditer(line):
            context = line[max(0, match.start() - 14) : match.end() + 14]
            if not SETUP_WORDS.search(context):
                found.append((match.group(0), line))
    return found


# Numbers of the pages that are not results: sizes of the setup, goals, the paper's figures, counts of things.
SETUP = {
    "README.md": {"0.01", "43.65", "5.24"},  # the paper's figures, a transformers version
    "benchmarks.md": {"50,304"},  # the vocabulary of the size classes
    "reproduction.md": {"1e-6", "3e-3", "192", "278"},  # a tolerance, a learning rate, MLP widths
    "demo.md": {"1", "75", "0.5"},  # 1 Samuel, the corpus's and the model's sizes
    "scale.md": {
        "0.75",
        "2,048",
        "4,096",
        "3",
        "29500",
        "100000",
        "16",
        "4",
        "7",
    },  # assumed words/token, cores, a BPE's size, steps, a port
}
# Numbers the prose derives from results (a difference, a mean, a cost model): (page, number) -> the value,
# from the files.
LIME_HEADS = json.loads((RESULTS / "reproduce.json").read_text(encoding="utf-8"))[
    "self_tagging_final_eval_metrics"
]["lm-lime_heads-s0"]
# The cost models of scale.md: the paper's 302B tokens at 0.75 words per token, at the measured rates per core.
PAPER_WORDS = 302e9 * 0.75
ANNOTATE_RATE = next(
    float(row["marginal_words_per_s"]) / 2
    for row in csv.DictReader((RESULTS / "datatrove_annotation.csv").open(encoding="utf-8"))
    if row["setup"] == "local, 2 workers"
)
# The baseline's final perplexity, the mean of its seeds (the honest stage compares self-guided LIME+1 with it).
BASELINE_PERPLEXITIES = {
    row["seed"]: row["baseline_perplexity"]
    for row in json.loads((RESULTS / "reproduce_honest.json").read_text(encoding="utf-8"))["rows"]
}
PACK_RATE = next(
    float(row["marginal_words_per_s"])
    for row in csv.DictReader((RESULTS / "pack_throughput.csv").open(encoding="utf-8"))
    if row["setup"] == "local, 1 worker"
)
DERIVED = {
    ("reproduction.md", "1.9"): 100
    * (LIME_HEADS["full_doc_tags"]["accuracy"] - LIME_HEADS["noise_10"]["accuracy"]),
    ("scale.md", "4,446"): ANNOTATE_RATE,
    ("scale.md", "14,150"): PAPER_WORDS / ANNOTATE_RATE / 3600,
    ("scale.md", "6.9"): PAPER_WORDS / ANNOTATE_RATE / 2048 / 3600,
    ("scale.md", "38.8"): PACK_RATE / ANNOTATE_RATE,
    ("scale.md", "1.3e6"): PAPER_WORDS / PACK_RATE,
    ("scale.md", "365"): PAPER_WORDS / PACK_RATE / 3600,
    ("scale.md", "0.18"): PAPER_WORDS / PACK_RATE / 2048 / 3600,
    ("README.md", "14,150"): PAPER_WORDS / ANNOTATE_RATE / 3600,
    ("README.md", "365"): PAPER_WORDS / PACK_RATE / 3600,
    ("reproduction.md", "131.0"): sum(BASELINE_PERPLEXITIES.values()) / len(BASELINE_PERPLEXITIES),
}


def test_the_benchmarks_table_is_the_one_the_results_files_give():
    assert benchmarks_table() in (DOCS / "benchmarks.md").read_text(encoding="utf-8")


def test_every_meta_attention_run_on_record_is_quoted_with_honest_tallies():
    page = " ".join((DOCS / "benchmarks.md").read_text(encoding="utf-8").split())
    table = meta_attention_runs.table()
    assert " ".join(table.split()) in page
    assert len(table.splitlines()) == 2 + len(meta_attention_runs.RUNS)  # missed goals included
    tallies = meta_attention_runs.tallies()
    for key in ("step_default_shape", "generate_default_shape"):
        met, total = tallies[key]
        assert f"met in {met} of {total}" in page.replace("**", "")
    for low, high in meta_attention_runs.ranges().values():
        assert f"{low:.2f}-{high:.2f}x" in page


@pytest.mark.parametrize("page", RESULT_PAGES, ids=lambda page: page.name)
def test_every_quoted_number_is_in_a_results_file(page: Path):
    numbers = result_numbers(SOURCES[page.name])
    unbacked = [
        f"{number} in: {line}"
        for number, line in quoted_numbers(page)
        if number not in SETUP[page.name]
        and not backed(number, numbers + [DERIVED.get((page.name, number), float("nan"))])
    ]
    assert not unbacked, "\n".join(unbacked)


def test_the_finder_can_fail():
    numbers = result_numbers(SOURCES["reproduction.md"])
    assert backed("20.08", numbers) and backed("1.494e+04", numbers)
    # Canaries: numbers next to quoted results that no results file backs (a new run can make one real: pick again).
    assert not backed("20.09", numbers) and not backed("1.493e+04", numbers)


def test_the_demo_page_quotes_the_demo_run():
    demo = json.loads((RESULTS / "demo.json").read_text(encoding="utf-8"))
    page = " ".join((DOCS / "demo.md").read_text(encoding="utf-8").split())
    for text in demo["generated"].values():
        assert f'"{text}"' in page
    for key in ("lime_steps_to_baseline_final", "honest_steps_to_baseline_final"):
        assert f"after {demo[key]} of the {demo['settings']['max_steps']} steps" in page
    assert f"ends {demo['honest_gain_points']:.2f} points above the baseline" in page
    final = {name: f"{100 * accuracy:.2f} %" for name, accuracy in demo["final_accuracy"].items()}
    assert " | ".join(final[name] for name in ("baseline", "honest LIME", "LIME", "LIME+1")) in page
    for name, tags in demo["tags_read"].items():  # every column names the tags its model read
        assert f"{name} ({tags})" in page


def test_a_changed_number_is_found_out(tmp_path):
    """The check reads the page as written: a number nudged by one in its last digit is no longer backed."""
    page = DOCS / "reproduction.md"
    changed = tmp_path / page.name
    changed.write_text(
        page.read_text(encoding="utf-8").replace("| 20.08 % |", "| 20.09 % |"), encoding="utf-8"
    )
    numbers = result_numbers(SOURCES[page.name])
    assert all(backed(number, numbers) for number, line in quoted_numbers(page) if "20.08" in line)
    assert not all(backed(number, numbers) for number, line in quoted_numbers(changed) if "20.09" in line)
