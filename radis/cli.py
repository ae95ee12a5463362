"""The `radis` console command.

    radis build-data    --config X.yaml [key=value ...]   sources -> packed shards
    radis inspect-data  --config X.yaml [key=value ...]   show examples with spans marked
    radis generate      --config X.yaml [key=value ...]   the model writes rationales or baseline targets
    radis rationales    (the same as generate)
    radis train         --config X.yaml [key=value ...]   RaDis / vanilla on DeepSpeed
    radis export        --checkpoint DIR --out DIR        consolidated HF model directory
    radis evaluate      --config X.yaml [key=value ...]   BLEU/chrF/COMET + retention
    radis compare       --config X.yaml --arms A,B,...    every arm of the paper's comparison, end to end

Each subcommand lives in its own module exposing `add_arguments(parser)` and
`run(args) -> int`; modules are imported only when their subcommand runs, so
`radis --help` stays fast and does not import torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "build-data": ("radis.data.build", "tokenise, span-label and pack parallel data into cached shards"),
    "inspect-data": ("radis.data.inspect", "print examples with prompt / translation / rationale spans marked"),
    "generate": ("radis.generation.command",
                 "the model writes its own training data: rationales, Seq-KD or SDFT targets (distributed, resumable)"),
    "rationales": ("radis.generation.command", "the same as `radis generate` (its first name)"),
    "train": ("radis.train.command", "train with RaDis or vanilla fine-tuning on DeepSpeed"),
    "export": ("radis.train.export", "export a checkpoint as a consolidated Hugging Face model directory"),
    "evaluate": ("radis.evaluate.command", "translation quality and general-ability retention"),
    "compare": ("radis.compare", "the paper's comparison: generate, train, export and evaluate every arm"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="radis",
        description="RaDis: rationale distillation for translation fine-tuning of chat LLMs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n")[1],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        # The module is imported to describe its arguments only when this subcommand
        # (or its --help) is asked for.
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in SUBCOMMANDS:
        args = parser.parse_args(argv)
        parser.print_help()
        return 0 if not argv else 2
    name = argv[0]
    module_name, help_text = SUBCOMMANDS[name]
    from radis.runtime import quiet_known_warnings

    quiet_known_warnings()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("radis"):
            print(f"radis {name}: not available in this build ({err})", file=sys.stderr)
            return 2
        raise
    args = parse_subcommand(module, name, help_text, argv[1:])
    from radis.config import ConfigError
    from radis.data.languages import UnknownLanguageError
    from radis.errors import InputError
    from radis.models import ModelNotFoundError

    # Bad input is the user's to fix: its message (naming the key, file or line) and exit
    # status 2, on every rank, no traceback. Anything else is a bug and keeps its traceback.
    try:
        return int(module.run(args) or 0)
    except ConfigError as err:
        print(f"radis {name}: config error: {err}", file=sys.stderr)
        return 2
    except (InputError, ModelNotFoundError, UnknownLanguageError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"radis {name}: error: {message}", file=sys.stderr)
        return 2


def parse_subcommand(module, name: str, help_text: str, argv: list[str]) -> argparse.Namespace:
    """The arguments of `radis <name> argv...` as that subcommand's parser reads them."""
    sub = argparse.ArgumentParser(prog=f"radis {name}", description=(module.__doc__ or help_text).strip(),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(sub)
    # intermixed: `key=value` overrides may come before and after the options
    # (`radis generate --config X a=1 --no-progress b=2`; plain parse_args refuses b=2)
    args = sub.parse_intermixed_args(argv)
    args.command_name = name  # the name it was called by (`radis rationales` is `radis generate`)
    return args


def _version() -> str:
    from radis import __version__

    return __version__


if __name__ == "__main__":
    sys.exit(main())
