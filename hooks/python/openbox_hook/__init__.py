"""openbox-agent's worker hook for Temporal Python workers.

``Worker(..., interceptors=[OpenBoxHook()])`` (or :func:`create_openbox_worker`, which
takes the OpenBox SDK's parameters) tells openbox-agent which activity runs on which
thread, so everything the agent captures in the kernel is attributed to its activity,
carries out the agent's governance decisions on activities, and reports workflow events.
"""

import temporalio.workflow

# Temporal's sandbox imports a workflow's module afresh for every run, with its imports;
# a file that defines workflows and also builds its worker with the hook would run the
# hook's modules again in there (and fail: they map memory and start threads). Passed
# through, the sandbox uses the modules already loaded outside it.
with temporalio.workflow.unsafe.imports_passed_through():
    from ._propagate import carry
    from ._version import __version__
    from .hook import OpenBoxHook
    from .worker import create_openbox_worker

__all__ = ["OpenBoxHook", "__version__", "carry", "create_openbox_worker"]
