"""The `parafill` command: serve, complete, status, and the project's tools.

`parafill serve` runs the language server over stdio (what editors start);
`parafill complete FILE:LINE:COL` prints one suggestion and its timing through
the same path the server uses (`lsp_server.suggest`); `parafill status` loads
the model and prints what it is and where it runs. `train`, `eval`, `bench`,
`corpus`, `model` and `engine` hand their arguments to the module that does the work.
Network connections: `parafill model pull` downloads; `parafill engine` serves a
team engine (on 127.0.0.1 unless told otherwise); `parafill serve --engine URL`
connects to that URL and nowhere else.
Errors a user can hit (a bad model directory, a missing file) are one line and
exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

from lsp_server.logs import LEVELS, configure_logging
from lsp_server.settings import check_setting

EXIT_USAGE = 2

# name -> (module, what it does); the module's main(argv) does the work.
PASS_THROUGH = {
    "train": ("training.train", "train a native model (see `parafill train --help`)"),
    "eval": ("tools.evaluate", "evaluate a model on fill-in-the-middle benchmarks"),
    "bench": ("tools.bench", "measure latency and throughput"),
    "corpus": ("training.corpus", "build the training corpus"),
    "adapt": ("tools.adapt", "train a copy of the model on one repository's code (see `parafill adapt --help`)"),
    "model": ("tools.models", "list, pull (download), inspect or remove open models by name"),
    "engine": ("team_engine.main", "serve the model to a team's editors from a Ray Serve cluster "
                                   "(see `parafill engine --help`, docs/TEAM_ENGINE.md)"),
}
COMMANDS = ("serve", "complete", "status", *PASS_THROUGH)


class UserError(Exception):
    """A problem the user can fix; printed as one line, exit code 2."""


def add_common_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """--model/--device/--log-level/--log-file, accepted before or after the subcommand."""

    def default(value):
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("--model", metavar="DIR|NAME", default=default(None),
                        help="model directory (config.json, *.safetensors, tokenizer.json), or a model name "
                             "(`parafill model list`, hf:ORG/NAME) already pulled; "
                             "default: the model shipped with parafill")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=default("auto"),
                        help="where the model runs (default: auto = cuda if available)")
    parser.add_argument("--log-level", choices=LEVELS, default=default("warning"),
                        help="log verbosity (default: warning)")
    parser.add_argument("--log-file", metavar="PATH", default=default(None),
                        help="write logs here instead of stderr")


def setting_value(key: str, kind: type):
    """An argparse type: the option's text as `kind`, checked as the server checks setting `key`."""

    def parse(text: str):
        parsed, expected = check_setting(key, kind(text))  # ValueError: argparse says "invalid int value"
        if expected is not None:
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text}")
        return parsed

    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parafill",
        description="Inline code completions over LSP from a local masked-diffusion denoiser.",
    )
    add_common_options(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    serve = commands.add_parser("serve", help="run the language server over stdio (what editors start)")
    add_common_options(serve, suppress=True)
    serve.add_argument("--engine", metavar="URL", default=None, type=setting_value("engine", str),
                       help="send fills to the team engine at URL (`parafill engine`) instead of loading a model; "
                            "its token comes from PARAFILL_ENGINE_TOKEN or --engine-token-file")
    serve.add_argument("--engine-token-file", metavar="FILE", default=None,
                       help="the team engine's token file (PARAFILL_ENGINE_TOKEN wins when set)")

    complete = commands.add_parser("complete", help="print one completion at FILE:LINE:COL and its timing")
    add_common_options(complete, suppress=True)
    complete.add_argument("location", metavar="FILE:LINE:COL",
                          help="cursor position, LINE and COL 1-based as editors show them")
    complete.add_argument("--language", default="", help="LSP language id (default: from the file name)")
    complete.add_argument("--steps", type=setting_value("steps", int), default=None,
                          help="most denoising steps (0 = as many as needed)")
    complete.add_argument("--confidence-threshold", type=setting_value("confidenceThreshold", float), default=None,
                          help="commit every position at least this confident (0 < t <= 1)")
    complete.add_argument("--min-confidence", type=setting_value("minConfidence", float), default=None,
                          help="hide suggestions the model is less sure of (0 shows all; default 0.5)")
    complete.add_argument("--latency-budget-ms", type=setting_value("latencyBudgetMs", int), default=None,
                          help="stop the model after this many ms and show what it has (0 = no budget; "
                               "default: 1000 on a CPU, 500 on a GPU)")
    complete.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    status = commands.add_parser("status", help="load the model and print what it is and where it runs")
    add_common_options(status, suppress=True)

    for name, (module, summary) in PASS_THROUGH.items():
        commands.add_parser(name, help=summary, add_help=False)
    return parser


def parse_location(location: str) -> tuple[Path, int, int]:
    """FILE:LINE:COL → (path, line, column), LINE/COL 1-based; FILE may contain ':'."""
    parts = location.rsplit(":", 2)
    if len(parts) != 3:
        raise UserError(f"{location!r}: expected FILE:LINE:COL, e.g. src/app.py:12:5")
    path, line, col = parts
    try:
        line_no, col_no = int(line), int(col)
    except ValueError:
        raise UserError(f"{location!r}: LINE and COL must be whole numbers, e.g. src/app.py:12:5") from None
    if line_no < 1 or col_no < 1:
        raise UserError(f"{location!r}: LINE and COL start at 1, as editors show them")
    return Path(path), line_no, col_no


def load_engine(model: str | None, device: str):
    """The engine, or a UserError that says what is wrong with the model directory or name."""
    if model is not None:
        # Said before torch is imported, so a typo or a model not pulled yet costs no wait.
        from denoiser.catalogue import ModelNameError, parse_model_name
        from denoiser.hub_cache import ModelNotDownloaded, locate

        try:
            ref = parse_model_name(model)
            if ref is not None:
                locate(ref)  # the local cache only: a missing model names the pull command
        except (ModelNameError, ModelNotDownloaded) as exc:
            raise UserError(str(exc)) from None
        if ref is None and not Path(model).expanduser().is_dir():
            what = "no such directory" if not Path(model).expanduser().exists() else "not a directory"
            raise UserError(f"{model}: {what}; --model takes a model directory (config.json, *.safetensors, "
                            "tokenizer.json) or a model name (`parafill model list`)")
    from denoiser.backend import ModelLoadError
    from denoiser.engine import Engine

    try:
        return Engine.load(model, device=device)
    except ModelLoadError as exc:
        reason = str(exc).strip().splitlines()[0]
        if getattr(exc, "setting", None) == "device":
            reason += "; use --device cpu or --device auto"
        raise UserError(reason) from None
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"{model or 'default model'}: cannot load the model ({type(exc).__name__}: {exc})") from None


def run_serve(args: argparse.Namespace) -> int:
    from lsp_server.memory import fix_mmap_threshold, limit_malloc_arenas, start_releasing_free_memory

    limit_malloc_arenas()  # before any thread starts (lsp_server/memory.py says why)
    fix_mmap_threshold()
    start_releasing_free_memory()
    from lsp_server.server import create_server

    create_server(args.model, args.device, args.engine, args.engine_token_file).start_io()
    return 0


def run_complete(args: argparse.Namespace) -> int:
    from fim import LineIndex
    from fim.positions import index_to_utf16
    from lsp_server.settings import Settings, parse_settings
    from lsp_server.source_file import UnreadableSource, read_source
    from lsp_server.suggest import suggest

    # One completion, then the process ends: compiling steps for a server's later requests would
    # outlive it (set PARAFILL_CPU_COMPILE=auto to compile anyway, for the next start).
    os.environ.setdefault("PARAFILL_CPU_COMPILE", "off")
    path, line_no, col_no = parse_location(args.location)
    try:
        source = read_source(path)
    except OSError as exc:
        raise UserError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    except UnreadableSource as exc:
        raise UserError(str(exc)) from None
    if source.warning:
        print(f"parafill: warning: {source.warning}", file=sys.stderr, flush=True)
    text = source.text
    index = LineIndex.of(text)
    if line_no > index.line_count:
        raise UserError(f"{path}: line {line_no} is past the end (the file has {index.line_count} lines)")
    line_text = index.line_text(line_no - 1)
    if col_no > len(line_text) + 1:
        raise UserError(f"{path}:{line_no}: column {col_no} is past the end of the line ({len(line_text)} characters)")
    character = index_to_utf16(line_text, col_no - 1)

    overrides: dict = {}
    if args.steps is not None:
        overrides["steps"] = args.steps
    if args.confidence_threshold is not None:
        overrides["confidenceThreshold"] = args.confidence_threshold
    if args.min_confidence is not None:
        overrides["minConfidence"] = args.min_confidence
    if args.latency_budget_ms is not None:
        overrides["latencyBudgetMs"] = args.latency_budget_ms
    settings, _ = parse_settings(overrides, Settings())  # no problems: argparse checked each value

    load_started = time.perf_counter()
    engine = load_engine(args.model, args.device)
    load_ms = (time.perf_counter() - load_started) * 1000
    found = suggest(engine, text, line_no - 1, character, document=str(path.resolve()), path=str(path),
                    language_id=args.language, settings=settings)
    device = str(engine.backend.device)
    if args.json:
        print(json.dumps({
            "text": found.text, "raw": found.raw, "total_ms": round(found.total_ms, 3),
            "model_ms": round(found.model_ms, 3), "load_ms": round(load_ms, 3), "tokens": found.tokens,
            "steps": found.steps, "source": found.source, "device": device, "model": engine.backend.name,
            "confidence": found.confidence,
            "span": found.request.span.mode, "position": {"line": line_no - 1, "character": character},
        }))
    else:
        if found.text is not None:
            print(found.text, flush=True)
        print(f"parafill: {what_happened(found, settings)}; took {found.total_ms:.0f} ms, "
              f"{found.model_ms:.0f} ms in the model ({plural(found.tokens, 'token')}, "
              f"{plural(found.steps, 'denoising step')}; {engine.backend.name} on {device}, "
              f"loaded in {load_ms:.0f} ms)", file=sys.stderr)
    return 0


WHERE_FROM = {
    "model": "from the model",
    "completion_cache": "from the cache of earlier suggestions",
    "typed_ahead": "the rest of the previous suggestion",
}


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def what_happened(found, settings) -> str:
    """The outcome of one `parafill complete`, in words."""
    cut = getattr(found, "budget_cut", False)
    late = "; the latency budget stopped the model early (--latency-budget-ms 0 lets it finish)" if cut else ""
    if found.text is not None:
        kind = "rest-of-line suggestion" if found.request.span.mode == "line" else "suggestion of whole lines"
        sure = "" if found.confidence is None else f", confidence {found.confidence:.2f}"
        return f"{kind} {WHERE_FROM.get(found.source, found.source)}{sure}{late}"
    if found.dropped == "unsure":
        return (f"no suggestion: the model was not sure enough (confidence {found.confidence:.2f} "
                f"< minConfidence {settings.min_confidence:g}; --min-confidence 0 shows it){late}")
    if found.dropped == "postprocess":
        return ("no suggestion: what the model wrote added nothing here once tidied (it was blank, "
                f"or repeated the text after the cursor; --json shows it as \"raw\"){late}")
    if cut:
        return ("no suggestion: the latency budget ran out before the model wrote anything "
                "(--latency-budget-ms 0 lets it finish)")
    return "no suggestion: the model wrote nothing here"


def run_status(args: argparse.Namespace) -> int:
    engine = load_engine(args.model, args.device)
    print(json.dumps(engine.status(), indent=2))
    return 0


def run_pass_through(name: str, rest: list[str]) -> int:
    module_name, _ = PASS_THROUGH[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise UserError(f"`parafill {name}` is not available in this copy of parafill "
                            f"(module {module_name} is missing)") from None
        raise
    main = getattr(module, "main", None)
    if main is None and module_name == "training.corpus":
        main = getattr(importlib.import_module("training.corpus.__main__"), "main", None)
    if main is None:
        raise UserError(f"`parafill {name}`: {module_name} has no main(argv)")
    result = main(rest)
    return result if isinstance(result, int) else 0


def split_pass_through(argv: list[str]) -> tuple[list[str], str | None, list[str]]:
    """(common options, pass-through command or None, its arguments)."""
    takes_value = {"--model", "--device", "--log-level", "--log-file"}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in PASS_THROUGH:
            return argv[:i], arg, argv[i + 1:]
        if not arg.startswith("-"):
            break
        i += 2 if arg in takes_value else 1
    return argv, None, []


def start_logging(args: argparse.Namespace) -> None:
    try:
        configure_logging(args.log_level, args.log_file)
    except OSError as exc:
        raise UserError(f"{args.log_file}: cannot write the log file ({exc.strerror or exc})") from None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    common, tool, rest = split_pass_through(argv)
    try:
        if tool is not None:
            args = parser.parse_args(common + ["status"])  # only the common options matter here
            start_logging(args)
            return run_pass_through(tool, rest)
        args = parser.parse_args(argv)
        start_logging(args)
        if args.command == "serve":
            return run_serve(args)
        if args.command == "complete":
            return run_complete(args)
        return run_status(args)
    except UserError as exc:
        print(f"parafill: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
