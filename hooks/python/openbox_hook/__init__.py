"""openbox-agent's worker hook for Temporal Python workers.

``Worker(..., interceptors=[OpenBoxHook()])`` (or :func:`create_openbox_worker`, which
takes the OpenBox SDK's parameters) tells openbox-agent which activity runs on which
thread, so everything the agent captures in the kernel is attributed to its activity.
"""

from ._version import __version__
from .hook import OpenBoxHook
from .worker import create_openbox_worker

__all__ = ["OpenBoxHook", "__version__", "create_openbox_worker"]
