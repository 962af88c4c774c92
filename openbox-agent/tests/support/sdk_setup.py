"""openbox-temporal-sdk-python 1.0.0 set up as `create_openbox_worker` does, and an
activity's span opened as its activity interceptor opens one, without a Temporal server.
Shared by sdk_ops.py (the SDK's side of the spans test) and xtask/bench/http_loop.py
(the SDK variant of the HTTP benchmark), so both measure the same set-up.
"""

import contextlib

# Core's URL, ignored by the instrumentation as the worker ignores its own Core calls.
CORE_URL = "http://openbox-core.invalid"


def instrument(**options):
    """A WorkflowSpanProcessor, then `setup_opentelemetry_for_governance` with `options`
    (its defaults when none): the SDK's instrumentation is on from here."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    from openbox.otel_setup import setup_opentelemetry_for_governance
    from openbox.span_processor import WorkflowSpanProcessor

    trace.set_tracer_provider(TracerProvider())
    processor = WorkflowSpanProcessor(ignored_url_prefixes=[CORE_URL])
    setup_opentelemetry_for_governance(processor, ignored_urls=[CORE_URL], **options)
    return processor


@contextlib.contextmanager
def activity(processor, workflow_id, workflow_type, activity_type, activity_id="1"):
    """Runs the block inside an `activity.<activity_type>` span whose trace is registered
    with `processor` for a workflow of its own, as the activity interceptor does. Yields
    the workflow's span buffer (the spans the SDK would send) and the activity's span."""
    from opentelemetry import trace

    from openbox.types import WorkflowSpanBuffer

    buffer = WorkflowSpanBuffer(workflow_id=workflow_id, run_id="run-1",
                                workflow_type=workflow_type, task_queue="q")
    processor.register_workflow(workflow_id, buffer)
    tracer = trace.get_tracer("openbox.activity_interceptor")
    with tracer.start_as_current_span(
        f"activity.{activity_type}",
        attributes={"temporal.workflow_id": workflow_id, "temporal.activity_id": activity_id},
    ) as span:
        processor.register_trace(span.get_span_context().trace_id, workflow_id, activity_id)
        yield buffer, span
