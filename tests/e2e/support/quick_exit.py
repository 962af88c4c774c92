"""Ending a temporalio script without interpreter finalization.

temporalio's runtime threads can abort finalization (SIGABRT, "PyGILState_Release:
thread state … must be current") after all the work is done and printed, which turns a
clean run into a failed process. The scripts that run a worker or a client end with
`exit_now()`: flush what they wrote, then `os._exit`."""

import logging
import os
import sys


def exit_now(code: int = 0) -> None:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
