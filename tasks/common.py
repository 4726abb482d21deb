"""Helpers shared by the tasks."""

from __future__ import annotations

import logging

from prefect import get_run_logger
from prefect.exceptions import MissingContextError


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a task run, the module logger when a task is called with ``.fn``."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("ddpm")
