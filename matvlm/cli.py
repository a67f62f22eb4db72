"""`matvlm` command line: a table of subcommands over typed library functions.

Each subcommand is a function whose signature gives the flags (parameters without a
default are positional unless listed in the function's `cli_required`, which makes them required
flags; names in `cli_positional` are optional positionals; `a_b` becomes `--a-b`; bool defaults give `--x/--no-x`;
`list[int]` takes `0,4,8`) and whose docstring gives the help (`Args:` entries). A function that takes
`**settings` names a dataclass in `cli_settings`: one flag per field, help from its `Attributes:`.
Functions are imported only when their subcommand runs, so `matvlm --help` is instant.

Errors the user can fix (`MatvlmError`) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import os
import re
import sys
import typing
from pathlib import Path

# name -> (module:function, one-line summary). Groups map to nested tables.
COMMANDS: dict[str, tuple[str, str] | dict[str, tuple[str, str]]] = {
    "demo": ("matvlm.commands:demo", "convert -> distill -> evaluate -> answer, on the shipped toy teacher (CPU)"),
    "convert": ("matvlm.commands:convert", "turn a transformer teacher into a hybrid with Mamba-2 layers"),
    "distill": ("matvlm.commands:distill", "distil a hybrid from its teacher (layer + KL + CE losses)"),
    "bench": ("matvlm.commands:bench", "speed and memory vs the teacher: engine, transformers generate, roofline"),
    "bench-serve": ("matvlm.commands:bench_serve", "load-test the HTTP server: throughput, TTFT, inter-token latency"),
    "bench-kernels": ("matvlm.commands:bench_kernels", "GPU: check the Triton kernels against float64 and time them"),
    "bench-distill-step": ("matvlm.commands:bench_distill_step",
                           "GPU: one distillation step at TinyLLaVA-3.1B size (tokens/s, MFU, memory; --ddp)"),
    "eval": ("matvlm.commands:evaluate", "benchmarks (MME, POPE, SQA, TextVQA, GQA, VQAv2, MMBench, MMMU, MM-Vet, shapes)"),
    "chat": ("matvlm.commands:chat", "streaming terminal chat (images with /image PATH)"),
    "ui": ("matvlm.commands:ui", "Gradio web chat with image upload and sampling controls"),
    "serve": ("matvlm.commands:serve", "OpenAI-compatible HTTP server (batched, streaming)"),
    "import-gguf": ("matvlm.commands:import_gguf", "write a GGUF model (or the packaged SmolLM2) as a transformers directory"),
    "self-generate": ("matvlm.commands:self_generate", "distillation data from a teacher's own answers to prompts"),
    "eval-lm": ("matvlm.commands:eval_lm", "text models: perplexity, KL and greedy agreement of student vs teacher"),
    "info": ("matvlm.commands:info", "describe a model directory (format, layers, parameters)"),
    "export": ("matvlm.commands:export", "write a hybrid as a transformers-native Bamba model (loads without matvlm)"),
    "toy": {
        "tiny-teacher": ("matvlm.commands:tiny_teacher", "write a tiny random-weight teacher (for trying things)"),
        "data": ("matvlm.commands:toy_data", "write the Shapes-VQA benchmark (LLaVA JSON + PNG)"),
        "train-teacher": ("matvlm.commands:train_teacher", "train the toy teacher on Shapes-VQA (the shipped recipe)"),
        "ablations": ("matvlm.commands:toy_ablations", "the paper's ablations (Tables 2-4) at toy scale"),
    },
}


# --- docstring and signature -> argparse --------------------------------------------------------

def _doc_parts(fn, section: str = "Args") -> tuple[str, dict[str, str]]:
    """(description, {param: help}) from a Google-style docstring's `section` (Args, or Attributes of a
    dataclass)."""
    doc = inspect.getdoc(fn) or ""
    desc, _, rest = doc.partition(f"\n{section}:\n")
    helps: dict[str, str] = {}
    current = None
    for line in rest.splitlines():
        if re.match(r"^\S", line):              # a new section (Returns:, ...) ends Args
            break
        m = re.match(r"^\s{2,4}(\w+)(?: \(.*?\))?:\s*(.*)$", line)
        if m:
            current = m.group(1)
            helps[current] = m.group(2)
        elif current and line.strip():
            helps[current] += " " + line.strip()
    return desc.strip(), helps


def _list_action(item_type):
    """Lists take values separated by commas, spaces or both: `--batch 1,8` or `--compare a.json b.json`."""

    class ListAction(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            items = [x for v in values for x in v.split(",") if x.strip()]
            try:
                setattr(namespace, self.dest, [item_type(x) for x in items])
            except ValueError:
                parser.error(f"{option_string}: expected {item_type.__name__} values, got {' '.join(values)!r}")
    return ListAction


def _add_param(parser: argparse.ArgumentParser, name: str, param: inspect.Parameter, hint, help_text: str,
               positional: tuple[str, ...] = (), required: tuple[str, ...] = ()):
    flag = "--" + name.replace("_", "-")
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        hint, origin, args = args[0], typing.get_origin(args[0]), typing.get_args(args[0])
    help_text = help_text.replace("%", "%%")        # argparse %-formats help strings
    kw: dict = {"help": help_text}
    if origin is tuple:                             # a fixed-size tuple takes a list: --adam-betas 0.9,0.95
        origin, args = list, args[:1]
    if hint is bool:
        kw["action"] = argparse.BooleanOptionalAction
        kw["default"] = param.default if param.default is not inspect.Parameter.empty else False
        parser.add_argument(flag, **kw)
        return
    if origin is typing.Literal:
        kw["choices"] = list(args)
        kw["type"] = type(args[0])
    elif origin is list:
        kw["action"] = _list_action(args[0] if args else str)
        kw["nargs"] = "+"
        kw["metavar"] = "A,B"
    elif hint in (int, float, str, Path):
        kw["type"] = hint
    else:
        kw["type"] = str
    if param.default is inspect.Parameter.empty and name in required:
        parser.add_argument(flag, required=True, **kw)
    elif param.default is inspect.Parameter.empty:
        parser.add_argument(name, **kw)
    elif name in positional:                       # an optional positional (e.g. eval's MODEL)
        parser.add_argument(name, nargs="?", default=param.default, **kw)
    else:
        kw["default"] = param.default
        if param.default is not None and "default" not in help_text:
            kw["help"] = f"{help_text} (default: {param.default})"
        parser.add_argument(flag, **kw)


def build_parser(fn, prog: str) -> argparse.ArgumentParser:
    desc, helps = _doc_parts(fn)
    parser = argparse.ArgumentParser(prog=prog, description=desc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(fn)
    for name, param in inspect.signature(fn).parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            continue
        _add_param(parser, name, param, hints.get(name, str), helps.get(name, ""),
                   getattr(fn, "cli_positional", ()), getattr(fn, "cli_required", ()))
    settings = getattr(fn, "cli_settings", None)      # a dataclass, or "module:Class" (imported now)
    if settings is not None:
        _add_settings(parser, settings if isinstance(settings, type) else _resolve(settings))
    return parser


def _add_settings(parser: argparse.ArgumentParser, settings) -> None:
    """One flag per field of the dataclass `settings` (the function takes them as **kwargs), help from its
    docstring's Attributes, type from its annotation. A flag not given stays None, so a recipe file's value
    or the field's default applies; the help says the default."""
    import dataclasses

    group = parser.add_argument_group(f"settings ({settings.__name__}; also the keys of --config files)")
    _, helps = _doc_parts(settings, "Attributes")
    hints = typing.get_type_hints(settings)
    for f in dataclasses.fields(settings):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_text = helps.get(f.name, "")
        if default not in (None, "") and "default" not in help_text:
            shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
            help_text = f"{help_text} (default: {shown})"
        param = inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None)
        _add_param(group, f.name, param, hints[f.name] | None, help_text)


def _resolve(target: str):
    mod, _, attr = target.partition(":")
    return getattr(importlib.import_module(mod), attr)


def _top_help() -> str:
    lines = ["usage: matvlm <command> [options]   (matvlm <command> --help for its options)", "",
             "Convert a transformer VLM into a hybrid Mamba-2/transformer model, distil, evaluate,",
             "benchmark, chat and serve it (MaTVLM, arXiv 2503.13440).", "", "commands:"]
    for name, entry in COMMANDS.items():
        if isinstance(entry, dict):
            for sub, (_, summary) in entry.items():
                lines.append(f"  {name + ' ' + sub:<22}{summary}")
        else:
            lines.append(f"  {name:<22}{entry[1]}")
    return "\n".join(lines)


def _group_help(name: str, entry: dict[str, tuple[str, str]]) -> str:
    lines = [f"usage: matvlm {name} <{'|'.join(entry)}> [options]   (matvlm {name} <subcommand> --help for its options)",
             "", "subcommands:"]
    lines += [f"  {sub:<16}{summary}" for sub, (_, summary) in entry.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_help())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__
        print(f"matvlm {__version__}")
        return 0
    name, rest, prog = argv[0], argv[1:], f"matvlm {argv[0]}"
    entry = COMMANDS.get(name)
    if isinstance(entry, dict):
        if not rest or rest[0] not in entry:
            subs = ", ".join(entry)
            if rest and rest[0] in ("-h", "--help"):
                print(_group_help(name, entry))
                return 0
            print(f"matvlm: error: 'matvlm {name}' needs one of: {subs}", file=sys.stderr)
            return 2
        entry, prog, rest = entry[rest[0]], f"{prog} {rest[0]}", rest[1:]
    if entry is None:
        print(f"matvlm: error: unknown command {name!r}; see 'matvlm --help'", file=sys.stderr)
        return 2
    logging.basicConfig(level=os.environ.get("MATVLM_LOG", "WARNING").upper(),
                        format="%(levelname)s %(name)s: %(message)s")
    fn = _resolve(entry[0])
    ns = build_parser(fn, prog).parse_args(rest)
    from .errors import MatvlmError
    try:
        result = fn(**vars(ns))
    except MatvlmError as e:
        print(f"matvlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("matvlm: interrupted", file=sys.stderr)
        return 130
    return int(result) if isinstance(result, int) and not isinstance(result, bool) else 0


if __name__ == "__main__":
    sys.exit(main())
