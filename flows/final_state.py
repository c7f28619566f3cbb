"""A flow run's final state says how the run went, where a user looks first.

Prefect's runs list, ``prefect deployment run --watch`` and the engine's "Finished in state ..." line
show a state's *name*; its message is only on the run's Details tab. So a run that missed quality bars
finishes in a named Completed state, ``Completed: 2 bars missed`` (or ``Completed: 1 warning`` when
every bar is met but something else needs reading), and a clean run in plain ``Completed``. It stays a
Completed state: the outputs were written, and the bars are a verdict on them, not a crash.

A flow whose outcome is a decision the list must show names it first: a retrain that published a
version without promoting it is ``Completed: not promoted, 2 bars missed`` (or ``Completed: not
promoted`` when its bars were met but it scored below ``latest``), never a plain green ``Completed``.

The same words make one summary line, logged as the flow's last line and printed last by the CLI.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

from prefect.client.schemas.objects import State
from prefect.states import Completed

from tasks.engine.logs import run_log


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def missed_bars(bars: Mapping[str, bool]) -> list[str]:
    return [bar for bar, met in bars.items() if not met]


def outcome_name(bars: Mapping[str, bool], warnings: Sequence[str], verdict: str = "") -> str:
    """'Completed', 'Completed: N bar(s) missed', or 'Completed: N warning(s)' when no bar was missed.
    A ``verdict`` ('not promoted') comes first and replaces the warning count, which it explains:
    'Completed: not promoted, 2 bars missed', 'Completed: not promoted'."""
    missed = missed_bars(bars)
    parts = [verdict] if verdict else []
    if missed:
        parts.append(f"{_count(len(missed), 'bar')} missed")
    elif warnings and not verdict:
        parts.append(_count(len(warnings), "warning"))
    return "Completed" + (f": {', '.join(parts)}" if parts else "")


def outcome_message(bars: Mapping[str, bool], warnings: Sequence[str], lead: str = "") -> str:
    """'M of N quality bars met (missed: a, b)[; K warnings]', or, when the flow gives a ``lead`` (its own
    account, which says what it made of the bars: retrain's promotion decision), 'lead[; K warnings]', so
    the missed bars are not listed twice. No bars and no lead: 'no quality bar measured'."""
    missed = missed_bars(bars)
    if lead:
        parts = [lead]
    elif bars:
        parts = [f"{len(bars) - len(missed)} of {len(bars)} quality bars met"
                 + (f" (missed: {', '.join(missed)})" if missed else "")]
    else:
        parts = ["no quality bar measured"]
    if warnings:
        parts.append(_count(len(warnings), "warning"))
    return "; ".join(parts)


def outcome_state(bars: Mapping[str, bool], warnings: Sequence[str], *, lead: str = "", verdict: str = "",
                  data: Any = None) -> State:
    """The Completed state a flow returns: named by :func:`outcome_name`, ``data`` its result."""
    return Completed(name=outcome_name(bars, warnings, verdict), message=outcome_message(bars, warnings, lead),
                     data=data)


def summary_line(state: State, where: str = "") -> str:
    """The one line a terminal user reads: 'Completed: 2 bars missed - 2 of 4 quality bars met (...); see X'."""
    return f"{state.name} - {state.message}" + (f"; see {where}" if where else "")


def final_state(bars: Mapping[str, bool], warnings: Sequence[str], *, lead: str = "", verdict: str = "",
                where: str = "", data: Any = None) -> State:
    """:func:`outcome_state`, with its summary line logged as the flow's last line (a WARNING when
    anything needs reading, so it stands out in the log as the bars' own WARNINGs do)."""
    state = outcome_state(bars, warnings, lead=lead, verdict=verdict, data=data)
    run_log(summary_line(state, where), logging.INFO if state.name == "Completed" else logging.WARNING)
    return state
