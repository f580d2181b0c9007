"""The `thinklab` command. Flags of `generate` are derived from the spec dataclasses,
so the CLI can never drift from the specs notebooks use."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing

from thinklab.config import RunSpec, SpecError
from thinklab.specdoc import field_comments, field_help

_HINTS = typing.get_type_hints(RunSpec)
# RunSpec's nested specs become flag groups; its own scalar fields plain flags. New spec fields get flags for free.
_SECTIONS = {f.name: _HINTS[f.name] for f in dataclasses.fields(RunSpec) if dataclasses.is_dataclass(_HINTS[f.name])}
_TOP = [f for f in dataclasses.fields(RunSpec) if f.name not in _SECTIONS]
# spec field -> flag name where the field's own name would be unclear on a command line
_FLAG_NAMES = {("model", "name"): "model", ("sampling", "n"): "n-samples"}
# boolean spec fields that are plain switches on the command line (off unless given)
_SWITCHES = {("model", "trust_remote_code")}
_HELP = {"task": "task name, e.g. gsm8k, math500:level=5, rg:chain_sum:difficulty=3 (see `thinklab tasks`)",
         "n_problems": "problems drawn from the task", "task_seed": "seed that picks the subset of problems"}
_FLAGS: dict[tuple[str, str], str] = {}  # (spec class name, field) -> flag, to name the flag in errors


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line, not the whole usage text."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"thinklab: error: {message} (see `{self.prog} --help`)\n")


def _parse_scalar(kind):
    names = {int: "an int", float: "a number", bool: "a boolean (true/false)", str: "a string"}

    def parse(text: str):
        if text.lower() in ("none", "null", ""):
            return None
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
        else:
            try:
                return kind(text)
            except ValueError:
                pass
        raise argparse.ArgumentTypeError(f"{text!r} is not {names.get(kind, kind.__name__)}")

    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive int")
    return value


def _field_parser(tp):
    """An argparse `type` for a resolved field annotation; the spec itself checks what comes out."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if args and typing.get_origin(tp) is not typing.Literal else tp
    if typing.get_origin(base) is tuple:
        return lambda text: tuple(s for s in text.split("|") if s)
    if base in (int, float, bool, str):
        return _parse_scalar(base)
    return _parse_scalar(str)  # Literal and other annotations: the text, checked by the spec


def _add_spec_flags(p: argparse.ArgumentParser) -> None:
    taken = {"help"}
    for f in _TOP:
        flag = f.name.replace("_", "-")
        taken.add(flag)
        _FLAGS[(RunSpec.__name__, f.name)] = f"--{flag}"
        p.add_argument(f"--{flag}", dest=f.name, type=_field_parser(_HINTS[f.name]), default=f.default,
                       help=_HELP.get(f.name) or field_help(RunSpec, f.name, f.default))
    for section, cls in _SECTIONS.items():
        group = p.add_argument_group(f"{section} ({cls.__name__}: {cls.__doc__.strip().splitlines()[0]})")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            flag = _FLAG_NAMES.get((section, f.name), f.name.replace("_", "-"))
            if flag in taken:  # two sections with a field of the same name: qualify the later one
                flag = f"{section}-{flag}"
            taken.add(flag)
            _FLAGS[(cls.__name__, f.name)] = f"--{flag}"
            default = f.default if f.default is not dataclasses.MISSING else None
            if (section, f.name) in _SWITCHES:
                group.add_argument(f"--{flag}", dest=f"{section}.{f.name}", action="store_true",
                                   help=field_comments(cls).get(f.name))
                continue
            group.add_argument(f"--{flag}", dest=f"{section}.{f.name}", type=_field_parser(hints[f.name]), default=default,
                               metavar=f.name.upper(), help=field_help(cls, f.name, default))


def spec_from_args(args: argparse.Namespace) -> RunSpec:
    values = vars(args)
    sections = {
        section: cls(**{f.name: values[f"{section}.{f.name}"] for f in dataclasses.fields(cls)})
        for section, cls in _SECTIONS.items()
    }
    return RunSpec(**{f.name: values[f.name] for f in _TOP}, **sections)


def cmd_generate(args) -> int:
    from thinklab import tasks

    spec = spec_from_args(args)
    tasks.load_task(spec.task, spec.n_problems, spec.task_seed)  # bad input fails here, before torch loads

    from thinklab import runner

    if args.executor == "ray":
        from thinklab import ray_pool

        df = ray_pool.run(spec, runs_root=args.runs_root, actors=args.actors or 2, address=args.address,
                          cpus=args.actor_cpus, gpus=args.actor_gpus, chunk_problems=args.chunk_problems,
                          batch_size=args.batch_size, progress=not args.quiet)
    else:
        if args.actors is not None or args.address is not None:
            raise ValueError("--actors and --address need --executor ray")
        df = runner.run(spec, runs_root=args.runs_root, chunk_problems=args.chunk_problems, progress=not args.quiet,
                        batch_size=args.batch_size)
    if not args.quiet:
        acc = df["correct"].mean() if len(df) else float("nan")
        print(f"{len(df)} samples, accuracy {acc:.3f}, mean tokens {df['n_tokens'].mean():.1f}", file=sys.stderr)
    print(runner.run_dir(spec, args.runs_root))
    return 0


def cmd_models(args) -> int:
    from thinklab import models

    if args.materialize:
        for name in args.materialize:
            print(models.materialize(name, force=args.force))
        return 0
    rows = models.list_models()
    print(f"{'name':<20} {'aliases':<14} {'installed':<10} {'materialized':<13} path")
    for r in rows:
        print(f"{r['name']:<20} {r['aliases']:<14} {str(r['installed']):<10} {str(r['materialized']):<13} {r['path']}")
        print(f"{'':<20} {r['description']}")
    print("\nAny Hugging Face model id (org/name) or local model directory also works as --model.")
    return 0


def cmd_tasks(args) -> int:
    from thinklab import tasks

    for name, description in tasks.list_tasks():
        print(f"{name:<40} {description}")
    return 0


def cmd_regrade(args) -> int:
    from thinklab import grading
    from thinklab.store import RunStore, now_iso

    store = RunStore(args.run_dir)
    # the run's own rules: its grading options and think tags (None = the defaults the runner used)
    spec = store.read_meta().get("spec") or {}  # refuses a folder that is not a run before the lock could create it
    budget = spec.get("budget") or {}
    with store.lock():  # a generate of the same run must not write parts while they are rewritten
        before = store.load()
        after = grading.regrade_table(
            before,
            lenient_truncated=bool((spec.get("grading") or {}).get("lenient_truncated", False)),
            think_start=budget.get("think_start") or grading.THINK_START,
            think_end=budget.get("think_end") or grading.THINK_END,
        )
        store.replace_parts(after)
        store.update_meta(grader_version=grading.GRADER_VERSION, regraded=now_iso())
    changed = int((before["correct"] != after["correct"]).sum()) if len(before) else 0
    print(f"regraded {len(after)} samples with grader {grading.GRADER_VERSION}: {changed} changed correctness; "
          f"accuracy {before['correct'].mean():.3f} -> {after['correct'].mean():.3f}")
    return 0


def cmd_runs(args) -> int:
    from thinklab import catalog, paths

    frame = catalog.runs(args.runs)
    if args.study:
        frame = frame.filter(frame["study"] == args.study)
    if frame.is_empty():
        print(f"no runs in {args.runs or paths.runs_dir()}", file=sys.stderr)
        return 0
    print(catalog.format_table(frame))
    return 0


def cmd_show(args) -> int:
    from thinklab import viewer
    from thinklab.catalog import resolve_run

    run_dir = resolve_run(args.run, args.runs)
    out = args.out or f"{run_dir.name}-{(args.problem or 'first').replace('/', '_').replace(':', '_')}" \
                      f"-{args.sample if args.sample is not None else 0}.html"
    viewer.show(run_dir, args.problem, args.sample, out=out)
    print(out)
    return 0


def cmd_batch(args) -> int:
    from thinklab import batch

    index = batch.run_sweep(args.sweep, workers=args.workers, force=args.force, executor=args.executor,
                            address=args.address)
    failed = index.filter(index["status"] != "ok").height
    return 1 if failed else 0


def _add_plan_flags(p: argparse.ArgumentParser) -> None:
    """One flag per `FindingsPlan` field (lists take several values: --tasks gsm8k math500:level=1,2)."""
    from thinklab.findings import FindingsPlan

    group = p.add_argument_group("plan (each flag overrides the preset's value)")
    for f in dataclasses.fields(FindingsPlan):
        tp = eval(f.type, vars(typing)) if isinstance(f.type, str) else f.type
        flag = f"--{f.name.replace('_', '-')}"
        if typing.get_origin(tp) is tuple:
            group.add_argument(flag, dest=f"plan.{f.name}", nargs="+", type=_field_parser(typing.get_args(tp)[0]),
                               default=None, metavar=f.name.upper(),
                               help=f"full preset: {' '.join(map(str, f.default))}")
        else:
            group.add_argument(flag, dest=f"plan.{f.name}", type=_field_parser(tp), default=None,
                               metavar=f.name.upper(), help=f"full preset: {f.default}")


def cmd_findings(args) -> int:
    from thinklab import findings

    changes = {key.split(".", 1)[1]: value for key, value in vars(args).items() if key.startswith("plan.")}
    plan = findings.plan_from_options(args.preset, **changes)
    if args.generate:
        findings.generate(plan, runs_root=args.runs, progress=not args.quiet, block=args.block or None,
                          only=args.only)
    command = " ".join(["thinklab", *getattr(args, "argv", ["findings"])])
    path = findings.write_report(plan, runs_root=args.runs, out=args.out, figures_dir=args.figures,
                                 n_boot=args.n_boot, command=command)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="thinklab", description="Measure how language models behave at test time.")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the full traceback of an error (or set {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="run one spec and print its run directory")
    _add_spec_flags(g)
    g.add_argument("--runs-root", default=None, help="where runs live (default: data/runs)")
    g.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    g.add_argument("--chunk-problems", type=_positive_int, default=None,
                   help="problems per stored part (the unit of resumption); default: one batch of samples")
    g.add_argument("--batch-size", type=_positive_int, default=None,
                   help="rows the backend decodes at once (speed only: not part of the run id); "
                        "default: chosen from the model and the free memory")
    g.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="generate in this process (default) or fan the run's chunks out to a pool of Ray actors")
    g.add_argument("--actors", type=_positive_int, default=None,
                   help="Ray actors for --executor ray, each holding a loaded backend (default: 2)")
    g.add_argument("--address", default=None,
                   help="Ray cluster address for --executor ray (e.g. auto, host:6379); default: start a local Ray")
    g.add_argument("--actor-cpus", type=float, default=1.0, help="CPUs per Ray actor (default: 1)")
    g.add_argument("--actor-gpus", type=float, default=0.0, help="GPUs per Ray actor (1: one actor per GPU; default: 0)")
    g.set_defaults(func=cmd_generate)

    m = sub.add_parser("models", help="list the embedded models and whether they are materialized")
    m.add_argument("--materialize", nargs="*", metavar="NAME", help="convert these embedded models now")
    m.add_argument("--force", action="store_true", help="reconvert even if materialized")
    m.set_defaults(func=cmd_models)

    t = sub.add_parser("tasks", help="list task names")
    t.set_defaults(func=cmd_tasks)

    r = sub.add_parser("regrade", help="re-grade a stored run with the current grader")
    r.add_argument("run_dir")
    r.set_defaults(func=cmd_regrade)

    ls = sub.add_parser("runs", help="list stored runs: model, task, the knobs that vary, accuracy, status")
    ls.add_argument("--runs", default=None, help="where runs live (default: data/runs)")
    ls.add_argument("--study", default=None, help="only runs of this study")
    ls.set_defaults(func=cmd_runs)

    sh = sub.add_parser("show", help="write one sample of a run as a self-contained HTML page (the trace viewer)")
    sh.add_argument("run", help="run id (or a unique prefix of it) or run directory")
    sh.add_argument("--problem", default=None, help="problem id, e.g. gsm8k/12 (default: the run's first problem)")
    sh.add_argument("--sample", type=int, default=None, help="sample index of that problem (default: its first)")
    sh.add_argument("--out", default=None, help="the HTML file (default: <run id>-<problem>-<sample>.html here)")
    sh.add_argument("--runs", default=None, help="where runs live (default: data/runs)")
    sh.set_defaults(func=cmd_show)

    b = sub.add_parser("batch", help="run a papermill sweep file")
    b.add_argument("sweep")
    b.add_argument("--workers", type=_positive_int, default=1, help="sets run at once, each in its own process")
    b.add_argument("--force", action="store_true", help="rerun sets that already succeeded")
    b.add_argument("--executor", choices=["local", "ray"], default=None,
                   help="local processes (default) or one Ray task per set; default: the sweep file's `executor`")
    b.add_argument("--address", default=None,
                   help="Ray cluster address for --executor ray (e.g. auto, host:6379); default: the sweep file's ray.address")
    b.set_defaults(func=cmd_batch)

    f = sub.add_parser("findings",
                       help="write FINDINGS.md from the stored runs of the findings sweep (--generate runs it)")
    f.add_argument("--generate", action="store_true",
                   help="first run (or resume) every run of the plan, then write the report")
    f.add_argument("--preset", default="full", choices=["full", "smoke"],
                   help="full (the issue's scale, the default) or smoke (minutes)")
    f.add_argument("--runs", default=None, help="where runs live (default: data/runs)")
    f.add_argument("--out", default=None, help="the report (default: FINDINGS.md at the project root)")
    f.add_argument("--figures", default=None, help="where figures go (default: figures/findings)")
    f.add_argument("--n-boot", type=int, default=2000, help="bootstrap replicates per interval")
    f.add_argument("--quiet", action="store_true", help="no progress bars while generating")
    f.add_argument("--block", type=int, default=20,
                   help="with --generate: problems per block; every run generates a block before any run starts "
                        "the next, so a stopped sweep holds the same problems in every run (0: run by run)")
    f.add_argument("--only", nargs="+", choices=list("abcdefg"), default=None, metavar="FINDING",
                   help="with --generate: generate only the runs these findings read (e.g. --only a b c f), "
                        "to finish some findings in a short sitting; the report still covers all seven")
    _add_plan_flags(f)
    f.set_defaults(func=cmd_findings)
    return parser


DEBUG_ENV = "THINKLAB_DEBUG"
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _user_error(exc: BaseException) -> bool:
    """Bad input (a value, a file, a model, a damaged run) rather than a bug in thinklab."""
    from thinklab.models import ModelError

    if isinstance(exc, (ValueError, OSError, ModelError)):
        return True
    # thinklab's own RuntimeErrors carry messages written for users (e.g. a quantization that is unavailable)
    return isinstance(exc, RuntimeError) and _raised_by_thinklab(exc)


def _raised_by_thinklab(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR)


def _message(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, SpecError) and (flag := _FLAGS.get((exc.spec, exc.field))):
        text = f"{flag} {exc.value!r}: {text}"
    elif isinstance(exc, OSError) and exc.filename and text.startswith("[Errno"):
        text = f"{exc.strerror}: {exc.filename}"
    if not _raised_by_thinklab(exc):
        text += " (rerun with --debug for the traceback)"
    return text


def main(argv: list[str] | None = None) -> int:
    """Run one command; bad input ends in one line on stderr and exit code 2, never a traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    debug = args.debug or os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("thinklab: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug or not _user_error(exc):
            raise
        print(f"thinklab: error: {_message(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
