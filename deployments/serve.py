"""Register and serve the two deployments with one long-running command.

    brvo-augment serve [--cron '0 3 * * 1']          # or: python -m deployments.serve

* ``augment/augment``: on demand; its parameters are the augment flow's (soul_dir, run_dir,
  preset and the config fields), e.g.
  ``prefect deployment run augment/augment -p soul_dir=... -p run_dir=... --watch``.
* ``retrain/retrain``: on a cron schedule (weekly by default, Monday 03:00 UTC); it retrains
  only when the SOUL data or the config changed.

Default parameters come from the environment where this command runs (or the options):
BRVO_SOUL_DIR (the SOUL directory retrain watches), BRVO_REGISTRY_DIR (the model
registry retrain publishes to and augment reads its models from), BRVO_RETRAIN_CRON,
BRVO_RETRAIN_TIMEZONE, BRVO_RETRAIN_PRESET. Runs execute in subprocesses of this command,
on this machine; stopping it (Ctrl-C) leaves the schedule active on the server
(``pause_on_shutdown=False``), so scheduled runs wait for the next ``serve``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from storage.errors import BrvoError  # noqa: E402

DEFAULT_CRON = "0 3 * * 1"
from flows.settings import (ENV_REGISTRY_DIR, ENV_RETRAIN_CRON as ENV_CRON, ENV_RETRAIN_PRESET as ENV_PRESET,  # noqa: E402
                            ENV_RETRAIN_TIMEZONE as ENV_TIMEZONE, ENV_SOUL_DIR, registry_dir_setting,
                            soul_dir_setting)


def retrain_schedule(cron: str | None = None, timezone: str | None = None):
    """--cron, else $BRVO_RETRAIN_CRON, else weekly; a bad expression or timezone is a one-line error."""
    from prefect.schedules import Cron

    value = (cron or os.environ.get(ENV_CRON) or DEFAULT_CRON).strip()
    timezone = timezone or os.environ.get(ENV_TIMEZONE) or "UTC"
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise BrvoError(f"unknown timezone {timezone!r} for the retrain schedule; use an IANA name like "
                        f"'UTC' or 'Europe/London'") from None
    try:
        return Cron(value, timezone=timezone)
    except ValueError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise BrvoError(f"invalid retrain schedule {value!r} (timezone {timezone}): {first}; "
                        f"use five cron fields, e.g. '{DEFAULT_CRON}', and an IANA timezone") from None


def build_deployments(cron: str | None = None, soul_dir: str | None = None, registry_dir: str | None = None,
                      timezone: str | None = None, retrain_preset: str | None = None) -> list[Any]:
    """The two RunnerDeployments (not yet registered)."""
    from flows.augment import augment
    from flows.retrain import retrain

    soul_dir = soul_dir_setting(soul_dir)
    registry_dir = registry_dir_setting(registry_dir)
    retrain_preset = retrain_preset or os.environ.get(ENV_PRESET) or "demo"
    retrain_params: dict[str, Any] = {"preset": retrain_preset}
    if soul_dir:
        retrain_params["soul_dir"] = str(soul_dir)
    if registry_dir:
        retrain_params["registry_dir"] = str(registry_dir)
    augment_params = {"registry_dir": str(registry_dir)} if registry_dir else {}
    return [
        augment.to_deployment(
            name="augment",
            parameters=augment_params,
            description="SOUL directory -> augmented paired HDF5 dataset (+ card, report, figures). "
                        "Uses the registry's latest models when registry_dir has some.",
            tags=["brvo-augment"],
        ),
        retrain.to_deployment(
            name="retrain",
            schedules=[retrain_schedule(cron, timezone)],
            parameters=retrain_params,
            description="Retrain Pix2Pix + CRGAN into the model registry when the SOUL data changed.",
            tags=["brvo-augment"],
        ),
    ]


def serve_deployments(cron: str | None = None, soul_dir: str | None = None, registry_dir: str | None = None,
                      timezone: str | None = None, retrain_preset: str | None = None,
                      limit: int | None = None) -> None:
    """Register both deployments with the configured Prefect server and run their flow runs until stopped."""
    from prefect import serve
    from prefect.settings import PREFECT_API_URL

    deployments = build_deployments(cron, soul_dir, registry_dir, timezone, retrain_preset)
    if not PREFECT_API_URL.value():
        print("warning: PREFECT_API_URL is not set; serving against a temporary local server that stops "
              "with this command (see 'Run as a service' in the README)", file=sys.stderr)
    if not soul_dir_setting(soul_dir) or not registry_dir_setting(registry_dir):
        print(f"warning: scheduled retrain runs need {ENV_SOUL_DIR} and {ENV_REGISTRY_DIR} (or --soul-dir and "
              f"--registry-dir); without them they fail until set", file=sys.stderr)
    from flows.temporary_server import temporary_server_dies_with_this_process

    temporary_server_dies_with_this_process()  # a temporary server must not outlive a killed serve command
    serve(*deployments, pause_on_shutdown=False, limit=limit)


def add_serve_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The serve options, for this module's parser and for ``brvo-augment serve`` alike (one parser)."""
    p.add_argument("--cron", default=None, help=f"retrain schedule (default ${ENV_CRON} or '{DEFAULT_CRON}')")
    p.add_argument("--timezone", default=None, help=f"timezone of the cron schedule (default ${ENV_TIMEZONE} or UTC)")
    p.add_argument("--soul-dir", default=None, help=f"SOUL directory that retrain watches (default ${ENV_SOUL_DIR})")
    p.add_argument("--registry-dir", default=None,
                   help=f"model registry for retrain and augment (default ${ENV_REGISTRY_DIR})")
    p.add_argument("--retrain-preset", default=None, choices=["tiny", "demo", "full"],
                   help=f"config preset of scheduled retrains (default ${ENV_PRESET} or demo)")
    p.add_argument("--limit", type=int, default=None, help="most flow runs at once (default: no limit)")
    return p


def build_parser() -> argparse.ArgumentParser:
    return add_serve_arguments(argparse.ArgumentParser(prog="python -m deployments.serve",
                                                       description=__doc__.splitlines()[0]))


def run_from_args(args: argparse.Namespace) -> None:
    serve_deployments(cron=args.cron, soul_dir=args.soul_dir, registry_dir=args.registry_dir,
                      timezone=args.timezone, retrain_preset=args.retrain_preset, limit=args.limit)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_from_args(args)
    except BrvoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
