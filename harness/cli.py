"""The `harness` command: run, env, zoo, setup, report.

Exit codes: 0 everything ran or was skipped, 1 some combination failed (or a regression gate
tripped), 2 usage error. Usage errors print one line that names the fix, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from harness.errors import UsageError
from harness.options import RunOptions, add_run_options, add_selection_options, given_options, parse_bytes
from harness.registry import FRAMEWORKS, PRECISIONS, REFERENCE_FRAMEWORK

DEFAULT_REPORTS_DIR = Path("reports")


def cmd_run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from harness.environment import collect_environment
    from harness.plan.matrix import Capabilities
    from harness.records import Record
    from harness.report.printers import summary_table
    from harness.run.runner import Plan, Runner
    from harness.storage import RunWriter, combo_key, read_records, write_command

    if args.resume is not None:
        args = resumed_args(args)
    if args.shard:
        from harness.plan.shard import parse_shard, select_shard

        parse_shard(args.shard)  # a bad --shard is a usage error before anything is written
    env = collect_environment()
    plan = Plan.from_flags(vars(args).get, Capabilities.detect(env))
    options = plan.options
    if args.resume is not None:
        writer = RunWriter.reopen(args.resume, env)
        records = [Record.from_dict(r) for r in read_records(writer.path)]
    else:
        writer, records = RunWriter(args.out, env, args.run_id), []
        write_command(writer.path, run_argv(args))
    runner = Runner(plan, writer, env)
    combos = plan.combos()
    if args.shard:
        combos = select_shard(combos, plan.models, options, args.shard)
    done = {combo_key(r.to_dict()) for r in records}
    combos = [c for c in combos if (c.model, c.framework, c.precision, c.device) not in done]
    if args.resume is not None:
        print(f"resuming {writer.path}: {len(done)} combinations finished, {len(combos)} to run", file=sys.stderr)
    with tqdm(total=len(combos), unit="combo", file=sys.stderr, dynamic_ncols=True) as bar:
        try:
            for record in runner.run(combos, on_record=lambda r: bar.update(1)):
                bar.set_postfix_str(f"{record.model}-{record.precision}: {record.status}")
                records.append(record)
        except KeyboardInterrupt:
            print(f"\ninterrupted: {len(records)} finished records kept in {writer.results_path}", file=sys.stderr)
            return 130
    print(summary_table(r.to_dict() for r in records))
    print(f"\nrun dir: {writer.path}")
    if not args.no_report:
        from harness.report import write_report

        write_report([writer.path], out=writer.path / "report", formats=("md", "html"))
    return 1 if any(r.status == "failed" for r in records) else 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Predicted memory per model x precision, and where it fits: config.json only, no weights, no GPU."""
    import harness.quiet  # noqa: F401 - the plan builds meta models here, importing torch (and torchao)
    from harness.environment import collect_environment
    from harness.plan.matrix import Capabilities, Selection, split_list
    from harness.plan.preflight import plan_table
    from harness.report.printers import plan_printers

    capabilities = Capabilities.detect(collect_environment())
    selection = Selection.from_lists(args.models, REFERENCE_FRAMEWORK, args.precisions, args.devices, capabilities)
    given = given_options(vars(args).get, plan_only=True)
    options = RunOptions(**given | {"scenario": "finetune" if args.finetune else "inference"})
    budget = parse_bytes(args.budget_bytes) if args.budget_bytes else None
    if args.finetune:
        from harness.plan.preflight import training_plan_table

        rows = training_plan_table(selection.models, selection.precisions, selection.devices, capabilities, options,
                                   budget)  # fmt: skip
    else:
        rows = plan_table(selection.models, selection.precisions, selection.devices, capabilities, options, budget)
    printers = plan_printers()
    for name in split_list(args.format) or ("table",):
        if name not in printers:
            raise UsageError(f"unknown --format '{name}': use one of {', '.join(printers)}")
        print(printers[name](rows))
    return 0


def run_argv(args: argparse.Namespace) -> list[str]:
    """The arguments after `run` on this command line (what --resume repeats)."""
    argv = list(getattr(args, "argv", None) or [])
    return argv[argv.index("run") + 1 :] if "run" in argv else argv


def resumed_args(args: argparse.Namespace) -> argparse.Namespace:
    """--resume RUN_DIR: the arguments that run was started with, overridden by any given again here."""
    from harness.storage import read_command

    stored = read_command(args.resume)
    if stored is None:  # a run from before command.json: this command line says what to run
        return args
    parser = build_parser()
    defaults = vars(parser.parse_args(["run"]))
    merged = vars(parser.parse_args(["run", *stored]))
    merged |= {k: v for k, v in vars(args).items() if k not in defaults or v != defaults[k]}
    return argparse.Namespace(**merged)


def precision_table() -> tuple[list[str], list[list[str]]]:
    """Every registered precision: family, frameworks, what it needs, where it runs (the README's table)."""
    headers = ["precision", "family", "frameworks", "needs", "devices", "default", "description"]
    rows = []
    for p in PRECISIONS.values():
        extra = p.extra or (FRAMEWORKS[p.frameworks[0]].extra if p.quantized else None)
        needs = f"`pip install 'harness[{extra}]'`" if extra else "-"
        where = ", ".join(p.devices) or "nowhere yet"
        where += "".join(f"; not {kind}: {why}" for kind, why in p.device_reasons.items())
        rows.append(
            [p.name, p.family, ", ".join(p.frameworks), needs, where, "yes" if p.default else "", p.description]
        )
    return headers, rows


def cmd_precisions(args: argparse.Namespace) -> int:
    from harness.report.printers import markdown

    headers, rows = precision_table()
    if args.format == "md":
        print(markdown(headers, rows))
    else:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        for line in [headers, *rows]:
            print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    from harness.environment import collect_environment

    print(json.dumps(collect_environment().to_dict(), indent=2))
    return 0


# Benchmark checkpoints built on request, outside the default zoo: name -> "module:builder(out_dir)".
LARGE_BUILDS = {"qwen-0.5b-shape": "harness.zoo.archs:build_qwen_05b_shape"}


def cmd_zoo(args: argparse.Namespace) -> int:
    from harness import zoo
    from harness.registry import load_object

    names = zoo.ZOO if args.zoo_command == "list" or not args.names else args.names.split(",")
    for name in names:
        if name not in zoo.ZOO and name not in LARGE_BUILDS:
            known = ", ".join([*zoo.ZOO, *LARGE_BUILDS])
            raise UsageError(f"unknown zoo model '{name}': use one of {known}")
    if args.zoo_command == "list":
        print(f"zoo dir: {zoo.zoo_dir()}  (override with ${zoo.ZOO_DIR_ENV})")
        for entry in zoo.ZOO.values():
            state = "built" if zoo.is_built(entry.name) else "not built"
            print(f"{entry.name:20} {entry.kind:10} {state:10} {entry.description}")
        return 0
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    for name in names:
        if name in LARGE_BUILDS:  # ~1 GB of random bf16 weights: speed and memory at real size, not quality
            out = zoo.zoo_dir() / name
            if not (out / "config.json").is_file():
                load_object(LARGE_BUILDS[name])(out)
            print(f"{name}: {out}", flush=True)
            continue
        print(f"{name}: {zoo.ensure_built(name)}", flush=True)
    return 0


SETUP_FRAMEWORKS = tuple(name for name, framework in FRAMEWORKS.items() if framework.setup)


def cmd_setup(args: argparse.Namespace) -> int:
    """Install once, outside any worker, what a framework needs beyond pip (the registry's setup hook)."""
    import importlib.util

    from harness.errors import one_line
    from harness.registry import load_object

    framework = FRAMEWORKS[args.framework]
    missing = [p for p in framework.packages if importlib.util.find_spec(p) is None]
    if missing:
        raise UsageError(f"{args.framework} needs {', '.join(missing)}: pip install 'harness[{framework.extra}]'")
    try:
        print(load_object(framework.setup)(timeout_s=args.timeout), flush=True)
    except Exception as exc:
        print(f"harness: setup {args.framework} failed: {one_line(exc)}", file=sys.stderr)
        return 1
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from harness.report import write_report

    formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    runs = [Path(r) for r in (args.runs or [DEFAULT_REPORTS_DIR / "latest"])]
    return write_report(
        runs,
        baseline=Path(args.baseline) if args.baseline else None,
        out=Path(args.out) if args.out else None,
        formats=formats,
        budget_bytes=parse_bytes(args.budget_bytes) if args.budget_bytes else None,
        fail_on_regression_pct=args.fail_on_regression,
        quality_tolerance=args.quality_tolerance,
        history=Path(args.history) if args.history else None,
        prices=Path(args.prices) if args.prices else None,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the matrix, one isolated worker per combination")
    add_selection_options(run.add_argument)
    run.add_argument("--out", type=Path, default=DEFAULT_REPORTS_DIR, help="reports dir (default ./reports)")
    run.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    add_run_options(run.add_argument_group("run options").add_argument)
    run.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a killed run: finished combos are kept")
    run.set_defaults(func=cmd_run)

    plan = commands.add_parser(
        "plan", help="predicted memory and fit per model x precision, before any download or load"
    )
    add_selection_options(plan.add_argument, axes_only=True)
    plan.add_argument("--budget-bytes", help="also check a memory budget, e.g. 12G")
    plan.add_argument("--format", default="table", help="comma list of table, md, csv, json (default table)")
    plan.add_argument(
        "--finetune", action="store_true", help="plan one training step (LoRA/QLoRA, or full with --lora-rank 0)"
    )
    add_run_options(plan.add_argument_group("run options that the plan reads").add_argument, plan_only=True)
    plan.set_defaults(func=cmd_plan)

    precisions = commands.add_parser("precisions", help="every precision the registry declares, and where it runs")
    precisions.add_argument("--format", choices=("table", "md"), default="table")
    precisions.set_defaults(func=cmd_precisions)

    env = commands.add_parser("env", help="print this machine's fingerprint")
    env.set_defaults(func=cmd_env)

    zoo = commands.add_parser("zoo", help="list or build the default model zoo (and, by name, larger benchmarks)")
    zoo.add_argument("zoo_command", choices=("list", "build"))
    zoo.add_argument(
        "names", nargs="?", help=f"comma list of zoo models to build (default: the zoo), or {', '.join(LARGE_BUILDS)}"
    )
    zoo.set_defaults(func=cmd_zoo)

    setup = commands.add_parser(
        "setup",
        help="install, once and outside any worker, what a framework needs beyond pip (llamacpp: its converter)",
    )
    setup.add_argument("framework", choices=SETUP_FRAMEWORKS)
    setup.add_argument("--timeout", type=float, default=600.0, help="seconds for a download (default 600)")
    setup.set_defaults(func=cmd_setup)

    report = commands.add_parser("report", help="compare runs: tables, frontier, recommendation, regressions")
    report.add_argument("runs", nargs="*", help="run dirs (default reports/latest)")
    report.add_argument("--baseline", help="run dir to compare against")
    report.add_argument("--out", help="output dir (default: <first run>/report)")
    report.add_argument("--format", default="md,html", help="comma list of md, html, csv, parquet (default md,html)")
    report.add_argument("--budget-bytes", help="memory budget for the recommendation, e.g. 8G")
    report.add_argument(
        "--fail-on-regression", type=float, metavar="PCT", help="exit 1 on a significant regression > PCT"
    )
    report.add_argument("--quality-tolerance", type=float, default=0.01, help="ppl_delta_frac (or 1-cosine) allowed")
    report.add_argument("--history", metavar="DIR", help="earlier nights (one dir of run dirs each): trends, steps")
    report.add_argument("--prices", metavar="FILE", help="TOML of price_per_hour per hardware label: cost columns")
    report.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `harness env | head` ends quietly
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"harness: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
