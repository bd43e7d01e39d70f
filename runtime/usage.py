"""How the runtime's commands treat a user's mistake: one line on stderr and exit status 2.

`python -m kvpilot.runtime serve` (what pods run) and the `kvpilot` CLI share this, so a pod's log
says what is wrong in one line, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from kvpilot.runtime.memory.devices import UnknownDevice
from kvpilot.runtime.memory.facts import UnknownModel
from kvpilot.runtime.memory.planner import PlanError
from kvpilot.runtime.memory.support import UnsupportedOption

USAGE_ERROR = 2


class UsageError(Exception):
    """A mistake in what the user asked for: printed as one line, exit 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's default prints usage over several lines
        raise UsageError(f"{self.prog}: {message}")


# Every error a user can cause and fix; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[Exception], ...] = (UsageError, PlanError, UnknownModel, UnknownDevice, UnsupportedOption)


def run_main(build_parser: Callable[[], argparse.ArgumentParser], argv: Sequence[str] | None,
             user_errors: tuple[type[Exception], ...] = USER_ERRORS) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except user_errors as err:
        print(f"kvpilot: {err}" if not str(err).startswith("kvpilot") else str(err), file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        return 130
