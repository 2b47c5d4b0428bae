"""`lime-hf eval`: lm-evaluation-harness's own command line, with the `lime` model registered.

`lime-hf eval --help` is this command's own page (what `--model lime` and `tags=` are; standard library only, so it
answers at once), `lime-hf eval run --help` lm-eval's list of options. Before anything loads, the arguments alone
refuse what they can: a `tags=` that is no tag source or that the saved model cannot take (LIME+1 with
`tags=prefix`, `tags=model` without heads), a model folder that holds no LIME model, a task of `--include_path`
whose data file is not there. lm-eval's own errors (an unknown task, ...) end the command in one line as well.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..options import check_model_folder
from ..rules import EVAL_TAG_SOURCES, check_eval_tags
from ._common import Parser, add_command, one_line

HELP = """\
usage: lime-hf eval --model lime --model_args pretrained=PATH[,tags=SOURCE][,window=N] --tasks TASK[,TASK ...]
                    [lm-eval options]

lm-evaluation-harness's command line (`lm_eval`, same options), with the model `lime` registered.

--model lime   a LIME model saved with its LimeTokenizer (`save_pretrained`). lm-eval hands a model token ids
               only; `lime` gives each position its tags, from the source that `tags=` (in --model_args) names:
  tags=prefix  spaCy's tags of the token in the decoded text up to it (the last `window=` tokens, default 32),
               never from text after it; the default for LIME without tag heads
  tags=model   the model's own causal predictions, from its tag heads; the default for a model with heads
               (for LIME+1: self-guided)
  tags=none    every tag unknown, the backbone alone; the default for LIME+1 without heads (unguided). LIME+1
               reads the next token's tags, which only the answer holds: tags=prefix is refused for it
The results JSON records the source (config.lime_tags, config.lime_guidance).

Your own tasks: --include_path DIR, a folder of task YAMLs; a YAML's relative data_files are read beside it
(docs/evaluation.md, "Write your own task").

examples:
  lime-hf eval --model lime --model_args pretrained=lime-austen,tags=prefix --tasks lambada_openai --device cuda
  lime-hf eval --model lime --model_args pretrained=lime-austen --tasks my_cloze --include_path my_tasks
  lime-hf eval ls tasks       # lm-eval's tasks
  lime-hf eval run --help     # every lm-eval option: --batch_size, --limit, --output_path, --log_samples, ...
"""
# lm-eval's subcommands other than `run`: their arguments are not an evaluation's.
OTHER_SUBCOMMANDS = ("ls", "validate")


def add_parser(subparsers: Any) -> None:
    parser = add_command(
        subparsers,
        "eval",
        run,
        check,
        add_help=False,
        prefix_chars="\0",  # every argument reaches lm-eval unchanged; `--help` is answered by `check`
    )
    parser.add_argument("argv", nargs=argparse.REMAINDER)


def check(args: argparse.Namespace) -> None:
    """This command's help, or the checks of `--model lime`'s arguments that need no loading."""
    argv = args.argv
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP, end="")
        args.parser.exit()
    args.lm_eval_only = argv[0] in OTHER_SUBCOMMANDS or "-h" in argv or "--help" in argv
    if args.lm_eval_only:
        return
    options, _ = evaluation_parser().parse_known_args(argv)
    args.tasks = [task for words in options.tasks or () for task in words.split(",") if task]
    args.include_path = options.include_path
    if options.model == "lime":
        check_lime_model_args(model_arguments(options.model_args or []))


def evaluation_parser() -> Parser:
    """The few options of lm-eval's `run` that can be checked before loading (the others are left to lm-eval)."""
    parser = Parser(prog="lime-hf eval", add_help=False)
    parser.add_argument("--model", "-M")
    parser.add_argument("--model_args", "-a", nargs="+")
    parser.add_argument("--tasks", "-t", nargs="+")
    parser.add_argument("--include_path")
    return parser


def model_arguments(words: list[str]) -> dict[str, str]:
    """`--model_args` as lm-eval reads it: `key=value,key=value` (in one word or several) or one JSON object."""
    if len(words) == 1 and words[0].lstrip().startswith("{"):
        return {key: str(value) for key, value in json.loads(words[0]).items()}
    pairs = (pair.partition("=") for word in words for pair in word.split(",") if pair)
    return {key.strip(): value.strip() for key, _, value in pairs}


def check_lime_model_args(model_args: dict[str, str]) -> None:
    """`tags=` and `window=`, and against a saved model's config.json where `pretrained` is a folder here."""
    tags = model_args.get("tags")
    if tags is not None and tags not in EVAL_TAG_SOURCES:
        check_eval_tags(tags, metadata_shift=0, has_tag_heads=True)  # raises: no tag source
    window = model_args.get("window", "32")
    if not window.isdigit() or int(window) < 1:
        raise ValueError(f"window={window} must be a positive number of tokens (default: 32)")
    pretrained = model_args.get("pretrained")
    if pretrained is None:
        raise ValueError("--model lime needs pretrained=PATH in --model_args: a saved LIME model's folder")
    if Path(pretrained).exists():  # else a Hub id, checked once loaded
        config = check_model_folder(pretrained)
        check_eval_tags(
            tags,
            metadata_shift=config.get("metadata_shift", 0),
            has_tag_heads=bool(config.get("tag_head_fields")),
        )


def check_task_data_files(tasks: list[str], include_path: str | None) -> None:
    """
    Each named task of `--include_path` has its data files, beside its YAML or in the working directory (where
    `lime_hf.integrations.lm_eval` looks), before a model loads; `ValueError` naming the task and the file.
    """
    if include_path is None or not tasks:
        return
    import yaml  # lm-eval's dependency; a task YAML may hold lm-eval's own tags (`!function`), read as None here

    class TaskLoader(yaml.SafeLoader):
        pass

    TaskLoader.add_multi_constructor("!", lambda loader, suffix, node: None)
    for path in sorted(Path(include_path).rglob("*.yaml")):
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=TaskLoader)
        if not isinstance(config, dict) or config.get("task") not in tasks:
            continue
        files = (config.get("dataset_kwargs") or {}).get("data_files") or []
        files = files.values() if isinstance(files, dict) else [files]
        for name in (name for entry in files for name in ([entry] if isinstance(entry, str) else entry)):
            beside, here = path.parent / name, Path(name)
            if "://" not in name and not any(
                found.parent.exists() and any(found.parent.glob(found.name)) for found in (beside, here)
            ):
                raise ValueError(
                    f"task {config['task']!r} ({path}): its data file {name!r} is neither beside the YAML "
                    f"({path.parent}) nor in the working directory; fix data_files in the YAML"
                )


def run(args: argparse.Namespace) -> None:
    if args.lm_eval_only:  # help, `ls`, `validate`: lm-eval's own, without loading the `lime` model's code
        return lm_eval_cli(args)
    try:
        check_task_data_files(args.tasks, args.include_path)
        from ..integrations.lm_eval import main
    except ImportError as error:
        args.parser.error(f'{error}; `lime-hf eval` needs `pip install "lime_hf[eval]"`')
    except ValueError as error:
        args.parser.error(one_line(error))
    try:
        main(args.argv)
    except (ValueError, OSError) as error:  # an unknown task, a data file that does not load, ...
        message = one_line(error)
        if message.startswith("Tasks not found"):
            message += "; `lime-hf eval ls tasks` lists lm-eval's tasks, and --include_path DIR adds a folder of yours"
        args.parser.error(message)


def lm_eval_cli(args: argparse.Namespace) -> None:
    """lm-eval's command line as it is, for its help and its subcommands other than `run`."""
    import sys

    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as error:
        args.parser.error(f'{error}; `lime-hf eval` needs `pip install "lime_hf[eval]"`')
    sys.argv = ["lime-hf eval", *args.argv]
    cli_evaluate()
