"""openbox-agent's worker hook for Temporal Python workers.

``Worker(..., interceptors=[OpenBoxHook()])`` (or :func:`create_openbox_worker`, which
takes the OpenBox SDK's parameters, or ``Worker(..., plugins=[OpenBoxPlugin(...)])``, SDK
2.0's plugin) tells openbox-agent which activity runs on which
thread, so everything the agent captures in the kernel is attributed to its activity,
carries out the agent's governance decisions on activities, and reports workflow events.
"""

import temporalio.workflow

# Temporal's sandbox imports a workflow's module afresh for every run, with its imports;
# a file that defines workflows and also builds its worker with the hook would run the
# hook's modules again in there (and fail: they map memory and start threads). Passed
# through, the sandbox uses the modules already loaded outside it.
with temporalio.workflow.unsafe.imports_passed_through():
    from ._multi_agent import emit_handoff
    from ._propagate import carry
    from ._version import __version__
    from .hook import OpenBoxHook
    from .tracing import traced
    from .worker import create_openbox_worker

    try:
        from .plugin import OpenBoxPlugin
    except ImportError as _plugin_import_error:  # a temporalio without temporalio.plugin
        _missing = _plugin_import_error

        class OpenBoxPlugin:  # type: ignore[no-redef]
            """Stands in when the installed temporalio has no plugin support."""

            def __init__(self, *args: object, **kwargs: object) -> None:
                raise ImportError(
                    "OpenBoxPlugin needs a temporalio with temporalio.plugin "
                    f"(SimplePlugin): {_missing}. Upgrade temporalio, or use "
                    "create_openbox_worker(..., sdk_conventions='2.0')"
                )


__all__ = [
    "OpenBoxHook",
    "OpenBoxPlugin",
    "__version__",
    "carry",
    "create_openbox_worker",
    "emit_handoff",
    "traced",
]
