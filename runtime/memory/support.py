"""What the runtime runs, and the error for what it does not.

The planner, the operator and the loader read the same facts here, so a model the pods would
refuse is refused at plan time too, in the same words.
"""

from __future__ import annotations


class UnsupportedOption(ValueError):
    """An option this runtime does not run yet: refused at start-up, never silently ignored."""
