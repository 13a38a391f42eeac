"""
A fault for the integration tests: a worker process that cannot start.

Python imports C{sitecustomize} from C{PYTHONPATH} at start-up, so a daemon
started with this directory first on its C{PYTHONPATH} (children inherit
it) runs this before anything else.  While the file named by
C{USERLI_POSTFIX_TEST_WORKER_FAULT} exists, a worker process (one that
inherited listeners) exits at once with status 3, as one would that cannot
start; the first process is not affected.  Nothing in the daemon reads the
variable.
"""

from __future__ import annotations

import os
import sys

_fault = os.environ.get("USERLI_POSTFIX_TEST_WORKER_FAULT")
if _fault and os.environ.get("USERLI_POSTFIX_INHERITED_LISTENERS") and os.path.exists(_fault):
    sys.stderr.write("injected fault: this worker cannot start\n")
    sys.stderr.flush()
    os._exit(3)
