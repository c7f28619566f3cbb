"""`brvo-augment`: the whole flow, and the steps that have a command of their own, on a run directory.

The single-step subcommands come from the step table (each step's ``command``: name, help, preflight).
Each subcommand checks its inputs first (cheap, no Prefect), so a bad input is a one-line
``error: ...`` and exit code 2, never a traceback; then it calls the Prefect flow or the step's task,
so runs show up in Prefect when a server is configured and run ephemerally when not.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Single steps run as standalone task runs; their logs have no flow run to attach to.
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

EXIT_USER_ERROR = 2
EXIT_BARS_MISSED = 3


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=["tiny", "demo", "full"], default=None,
                   help="config preset (default: the run directory's run.json, else demo)")
    p.add_argument("--config", type=Path, default=None, help="JSON file of config fields overriding the preset")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brvo-augment", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantom", help="write a SOUL-layout phantom dataset (built-in demo data)",
                       description="Write a SOUL-layout phantom. Without options it is the demo's 53 patients; the "
                       "options make datasets unlike it (docs/phantom.md). Precedence: the demo's values, then "
                       "--config, then each option given.")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--config", type=Path, default=None, metavar="FILE.json",
                   help="JSON object of PhantomConfig fields, e.g. {\"n_patients\": 24, \"contrast\": 0.5}")
    p.add_argument("--patients", type=int, default=None, help="patients, 1..10000 (default 53)")
    p.add_argument("--seed", type=int, default=None, help="random seed, >= 0 (default 0)")
    p.add_argument("--image-size", type=int, default=None, help="image side in px, 32..2048 (default 304, SOUL's)")
    p.add_argument("--images-per-visit", default=None, metavar="LO-HI",
                   help="repeat scans per visit, within 1-8 (default 1-8 with SOUL's per-stage means), e.g. 1-2")
    p.add_argument("--attendance", default=None, metavar="F1,...,F6",
                   help="share of patients seen at each of the six stages, each in (0, 1] "
                        "(default SOUL's 48,36,37,26,20,11 of 53), e.g. 1,0.7,0.5,0.3,0.2,0.1")
    p.add_argument("--vessel-density", type=float, default=None, metavar="X",
                   help="how much vessel trees branch, 0.3..3 (default 1 = the demo)")
    p.add_argument("--vessel-width", type=float, default=None, metavar="X",
                   help="vessel width multiplier, 0.5..2.5 (default 1)")
    p.add_argument("--contrast", type=float, default=None, metavar="X",
                   help="vessels above the capillary mesh, 0..1.5 (default 1; 0 = vessels as bright as capillaries)")
    p.add_argument("--noise", type=float, default=None, metavar="X",
                   help="speckle, additive noise and motion lines multiplier, 0..3 (default 1; 0 = clean)")
    p.add_argument("--non-perfusion-size", type=float, default=None, metavar="X",
                   help="non-perfused area multiplier, 0..3 (default 1; 0 = no occluded sector)")
    p.add_argument("--attendance-follows-response", type=float, default=None, metavar="W",
                   help="course-dependent attendance, 0..1: poor responders stop coming earlier (default 0 = "
                        "attendance ignores the course; the stage shares stay --attendance's)")
    p.add_argument("--workers", type=int, default=2, help="rendering processes (the bytes do not depend on it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing phantom in OUT_DIR")
    p.add_argument("--truth-dir", type=Path, default=None, metavar="DIR",
                   help="also write the truth of the visits the patients missed (repeat scans and each stage's "
                        "true non-perfused area) into DIR, outside OUT_DIR, for evaluation only: OUT_DIR's bytes "
                        "do not change and no pipeline step reads DIR (docs/phantom.md)")

    for step in single_step_commands().values():
        command = step.command
        p = sub.add_parser(command.name, help=command.help)
        if step.reads_source:
            p.add_argument("soul_dir", type=Path)
        p.add_argument("run_dir", type=Path)
        if command.config_options:
            _add_config_args(p)
        if command.quality_bars:
            p.add_argument("--require-bars", action="store_true",
                           help=f"exit with code {EXIT_BARS_MISSED} when the model misses a quality bar "
                                "(it loses to a baseline); the checkpoints and report are written either way")

    p = sub.add_parser("prepare", help="ingest + preprocess (the 'prepare' flow)")
    p.add_argument("soul_dir", type=Path)
    p.add_argument("run_dir", type=Path)
    _add_config_args(p)

    p = sub.add_parser("run", help="the whole augment flow: SOUL_DIR -> RUN_DIR/augmented.h5 + card, report, figures")
    p.add_argument("soul_dir", type=Path)
    p.add_argument("run_dir", type=Path)
    _add_config_args(p)

    p = sub.add_parser("demo", help="phantom (53 patients) + the whole augment flow with the demo preset")
    p.add_argument("run_dir", type=Path, nargs="?", default=Path("demo_run"))
    p.add_argument("--preset", choices=["tiny", "demo", "full"], default="demo")
    p.add_argument("--patients", type=int, default=53)

    p = sub.add_parser("inspect", help="validate a brvo-paired .h5 file and print counts per split and stage")
    p.add_argument("file", type=Path)
    p.add_argument("--deep", action="store_true", help="also read every image chunk (finds damaged bytes)")

    from deployments.serve import add_serve_arguments

    add_serve_arguments(sub.add_parser("serve", help="register and serve the 'augment' and 'retrain' deployments"))
    return parser


def single_step_commands() -> dict:
    """Subcommand name -> the step of the augment plan it runs alone (every step declaring a ``command``)."""
    from flows.plans import AUGMENT

    return {step.command.name: step for step in AUGMENT if step.command is not None}


def resolve_config(args: argparse.Namespace, run_dir: Path | None = None):
    """Preset/config file from the command line; else the run directory's recorded config; else demo."""
    from tasks.config import load_config
    from tasks.engine.run_record import recorded_config

    if getattr(args, "preset", None) is None and getattr(args, "config", None) is None and run_dir is not None:
        recorded = recorded_config(run_dir)
        if recorded is not None:
            return recorded
    return load_config(getattr(args, "preset", None) or "demo", getattr(args, "config", None))


#: Subcommands that talk to Prefect: every one but reading a file (inspect).
OFFLINE_COMMANDS = {"inspect"}


def check_prefect_api(timeout_s: float = 5.0) -> None:
    """When PREFECT_API_URL is configured (environment or profile), fail in one line if nothing answers
    there, before any work; without it, Prefect starts a temporary local server itself."""
    import urllib.error
    import urllib.request

    from prefect.settings import PREFECT_API_URL
    from storage.errors import BrvoError

    url = PREFECT_API_URL.value()
    if not url or "api.prefect.cloud" in url:
        return
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout_s):
            return
    except urllib.error.HTTPError:
        return  # something answers: Prefect reports its own errors from here on
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise BrvoError(f"cannot reach the Prefect API at {url} ({reason}); start it (prefect server start) or "
                        f"unset PREFECT_API_URL (prefect config unset PREFECT_API_URL) to run without a server") from None


def _temporary_server_dies_with_cli() -> None:
    """Called after a command's cheap input checks, just before its first Prefect call: the temporary
    server Prefect starts when no PREFECT_API_URL is set must not outlive a killed CLI."""
    from flows.temporary_server import temporary_server_dies_with_this_process

    temporary_server_dies_with_this_process()


def _print_result_then_outcome(summary: dict) -> None:
    """The run's summary, then its one-line outcome last, where a terminal user's eye lands:
    'Completed: 2 bars missed - 2 of 4 quality bars met (missed: ...); 3 warnings; see .../report.md'."""
    print({key: value for key, value in summary.items() if key != "outcome"})
    print(summary["outcome"])


def _single_step(args: argparse.Namespace, step) -> int:
    """Run one step of the augment plan alone on RUN_DIR: its preflight first (no Prefect yet), then the step
    with the results of the steps it needs taken from their records, under the run-directory lock like every
    command that writes there; print its result."""
    from flows.plans import AUGMENT
    from flows.run_steps import run_steps
    from storage.run_dir import RunPaths
    from tasks.engine import StepContext, single_step_plan

    if not step.command.config_options:
        args.preset = args.config = None
    config = resolve_config(args, args.run_dir)
    source = args.soul_dir if step.reads_source else None
    if step.command.preflight is not None:
        step.command.preflight(StepContext(run_dir=Path(args.run_dir), config=config, source=source))
    _temporary_server_dies_with_cli()
    target = step.name
    plan = single_step_plan(AUGMENT, target, RunPaths.of(args.run_dir))
    run = run_steps(plan, args.run_dir, config, source=source, only={target})
    print(run.result(target).model_dump_json(indent=2, exclude={"training": {"history"}}))
    if getattr(args, "require_bars", False):
        missed = [bar for bar, met in run.report.get("bars", {}).items() if bar.startswith(target) and not met]
        if missed:
            print(f"quality bar(s) missed: {', '.join(missed)} (see {RunPaths.of(args.run_dir).report_md})", file=sys.stderr)
            return EXIT_BARS_MISSED
    return 0


def _run(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd == "phantom":
        from brvo_models.phantom.config import load_phantom_config, phantom_config

        base = load_phantom_config(args.config) if args.config is not None else None
        config = phantom_config(
            base, n_patients=args.patients, seed=args.seed, image_size=args.image_size,
            images_per_visit=args.images_per_visit, attendance=args.attendance, vessel_density=args.vessel_density,
            vessel_width=args.vessel_width, contrast=args.contrast, noise=args.noise,
            non_perfusion_size=args.non_perfusion_size, attendance_follows_response=args.attendance_follows_response)
        from flows.phantom import phantom_task, preflight_phantom

        preflight_phantom(args.out_dir, args.workers, args.overwrite, args.truth_dir)
        _temporary_server_dies_with_cli()
        summary = phantom_task(args.out_dir, config, workers=args.workers, overwrite=args.overwrite,
                               truth_dir=args.truth_dir)
        print(summary)
    elif cmd in single_step_commands():
        return _single_step(args, single_step_commands()[cmd])
    elif cmd == "prepare":
        from flows.prepare import prepare
        from tasks.ingest import check_source

        config = resolve_config(args, args.run_dir)
        check_source(args.soul_dir)
        _temporary_server_dies_with_cli()
        print(prepare(str(args.soul_dir), str(args.run_dir), preset=config.preset, config_json=config.to_json()))
    elif cmd == "run":
        from flows.augment import run_augment
        from tasks.ingest import check_source

        config = resolve_config(args, args.run_dir)
        check_source(args.soul_dir)
        _temporary_server_dies_with_cli()
        _print_result_then_outcome(run_augment(args.soul_dir, args.run_dir, config))
    elif cmd == "demo":
        from flows.augment import run_demo

        _temporary_server_dies_with_cli()
        _print_result_then_outcome(run_demo(args.run_dir, preset_name=args.preset, n_patients=args.patients))
    elif cmd == "inspect":
        from tasks.preprocess import inspect_dataset

        print(inspect_dataset(args.file, deep=args.deep))
    elif cmd == "serve":
        from deployments.serve import run_from_args

        run_from_args(args)
    return 0


#: exit status when the reader of stdout went away (``| head -1``): 128 + SIGPIPE, as a shell reports
#: for any tool that the closed pipe stopped
EXIT_BROKEN_PIPE = 141


def _error_line(message: str) -> None:
    """The one line an expected error ends with: ``error: ...`` on stderr, printed last (the CLI's
    temporary Prefect server and its workers are stopped first, so their exit-time lines come before)."""
    from flows.temporary_server import stop_this_process_temporary_server

    try:
        stop_this_process_temporary_server()
    except Exception as exc:  # noqa: BLE001 - the user's error matters more; say why the order may slip
        print(f"note: Prefect's background workers did not stop cleanly ({type(exc).__name__}: {exc})",
              file=sys.stderr)
    sys.stdout.flush()
    print(f"error: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    from storage.atomic import is_disk_full
    from storage.errors import BrvoError, DiskFullError

    args = build_parser().parse_args(argv)
    from tasks.engine.logs import install_one_line_errors

    install_one_line_errors()
    try:
        if args.command not in OFFLINE_COMMANDS:
            check_prefect_api()
        code = _run(args)
        sys.stdout.flush()  # inside the try: a closed pipe surfaces here, not at interpreter exit
        return code
    except BrokenPipeError:
        # the reader has what it wanted; point stdout at /dev/null so the exit-time flush stays quiet
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
    except BrvoError as exc:
        _error_line(str(exc))
        return EXIT_USER_ERROR
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        # a write outside storage's atomic layer (a library's own file): still one line, exit 2
        _error_line(str(DiskFullError(exc.filename or "an output file")))
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
