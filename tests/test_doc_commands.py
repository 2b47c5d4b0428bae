"""Every `lime-hf` command in a ```bash block of the README and of the docs pages parses: the command exists, and
so does each option, with a value it accepts (a Trainer option of `train` included). They are not run: they name
corpora, clusters and GPUs this machine does not have; the commands themselves run in tests/test_cli*.py."""

import re
import shlex
from pathlib import Path

import pytest

from lime_hf.cli import build_parser
from lime_hf.cli.train import parse_train_arguments, trainer_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def commands(page: Path) -> list[str]:
    """The `lime-hf ...` command lines of the page's bash blocks, continuation lines joined, comments dropped."""
    found = []
    for block in re.findall(
        r"^```bash\n(.*?)^```$", page.read_text(encoding="utf-8"), flags=re.DOTALL | re.M
    ):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["lime-hf"]:
                found.append(words[1:])
    return found


DOC_COMMANDS = [(page.name, argv) for page in PAGES for argv in commands(page)]


def test_the_pages_show_commands():
    assert len(DOC_COMMANDS) > 20
    assert {argv[0] for _, argv in DOC_COMMANDS} >= {
        "annotate",
        "pack",
        "train",
        "generate",
        "tag",
        "demo",
        "eval",
    }


@pytest.mark.parametrize(
    ("page", "argv"), DOC_COMMANDS, ids=[f"{page} {' '.join(argv)[:50]}" for page, argv in DOC_COMMANDS]
)
def test_every_documented_command_parses(page, argv):
    try:
        args = build_parser(argv[0]).parse_args(argv)
        if argv[0] == "train":
            _, trainer_argv = parse_train_arguments(args.argv)
            _, unknown = trainer_parser().parse_known_args(trainer_argv)
            assert not unknown, f"{page}: unknown Trainer options {unknown} in `lime-hf {' '.join(argv)}`"
    except SystemExit as error:  # argparse's usage error
        pytest.fail(f"{page}: `lime-hf {' '.join(argv)}` does not parse (exit {error.code})")
