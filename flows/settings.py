"""The environment variables the flows and the deployments read, in one place.

A flow parameter always wins; the variable is the default where the flow runs (the
``serve`` command's machine, or a work-pool worker's), so a deployment started as the
README says finds the same data and registry through either.
"""
from __future__ import annotations

import os

ENV_SOUL_DIR = "BRVO_SOUL_DIR"
ENV_REGISTRY_DIR = "BRVO_REGISTRY_DIR"
ENV_RETRAIN_CRON = "BRVO_RETRAIN_CRON"
ENV_RETRAIN_TIMEZONE = "BRVO_RETRAIN_TIMEZONE"
ENV_RETRAIN_PRESET = "BRVO_RETRAIN_PRESET"


def soul_dir_setting(value: str | None = None) -> str | None:
    """The SOUL directory (or manifest CSV): the parameter, else $BRVO_SOUL_DIR."""
    return value or os.environ.get(ENV_SOUL_DIR) or None


def registry_dir_setting(value: str | None = None) -> str | None:
    """The model registry: the parameter, else $BRVO_REGISTRY_DIR."""
    return value or os.environ.get(ENV_REGISTRY_DIR) or None
