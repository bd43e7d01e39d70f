"""`python -m kvpilot.runtime serve ...`: the pod's entry point, the same CLI as `kvpilot`."""

import sys

from kvpilot.runtime.cli import main

sys.exit(main())
