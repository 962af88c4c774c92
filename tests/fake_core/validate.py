#!/usr/bin/env python3
"""Validate requests recorded by fake_core.py against tests/schema/openbox-core-v1.schema.json.

Python 3.11 standard library only, so it implements the small JSON Schema subset the
schema uses: type, const, enum, required, properties, additionalProperties (bool or
schema), items, pattern, minimum, minLength, maxLength, oneOf, anyOf, not, and local $ref
("#/$defs/x").
Annotation keywords ($schema, $id, title, description, $defs) are ignored.

Usage:
    validate.py RECORDED.jsonl [--schema PATH] [--def NAME]
        Each line is a recorded request {method, path, headers, body, ...}. Validated against
        the top-level schema, or with --def NAME each line's `body` against $defs/NAME.
        Exit 0 when every line is valid, 1 otherwise (each problem printed as
        "line N: <json path>: <what>").
    validate.py --self-test
        Checks the validator and the schema on built-in good and bad samples.
"""

import argparse
import json
import math
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SCHEMA = os.path.join(HERE, "..", "schema", "openbox-core-v1.schema.json")


def _type_ok(value, name):
    if name == "null":
        return value is None
    if name == "boolean":
        return isinstance(value, bool)
    if name == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and math.isfinite(value) and value.is_integer()
        )
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if name == "string":
        return isinstance(value, str)
    if name == "array":
        return isinstance(value, list)
    if name == "object":
        return isinstance(value, dict)
    raise ValueError(f"unsupported type {name!r}")


def _same(a, b):
    """JSON equality (1 == 1.0, but True != 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


class Validator:
    SUPPORTED = {
        "type", "const", "enum", "required", "properties", "additionalProperties", "items",
        "pattern", "minimum", "minLength", "maxLength", "oneOf", "anyOf", "not", "$ref",
        "$schema", "$id", "title", "description", "$defs",
    }

    def __init__(self, root):
        self.root = root
        self._check_keywords(root)

    def _check_keywords(self, schema):
        if isinstance(schema, dict):
            for key, sub in schema.items():
                # `properties` and `$defs` map names to schemas: their keys are not keywords.
                if key in ("properties", "$defs"):
                    for s in sub.values():
                        self._check_keywords(s)
                elif key not in self.SUPPORTED:
                    raise ValueError(f"schema uses unsupported keyword {key!r}")
                elif key not in ("const", "enum", "required") and isinstance(sub, (dict, list)):
                    self._check_keywords(sub)
        elif isinstance(schema, list):
            for s in schema:
                self._check_keywords(s)

    def resolve(self, ref):
        if not ref.startswith("#/"):
            raise ValueError(f"only local $ref is supported, not {ref!r}")
        node = self.root
        for part in ref[2:].split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        return node

    def errors(self, value, schema, path="$"):
        """All problems of `value` against `schema`, as (path, message, is_const) triples;
        is_const marks a `const` mismatch (a oneOf discriminator such as event_type)."""
        if schema is True or schema == {}:
            return []
        if schema is False:
            return [(path, "no value is allowed here", False)]
        out = []
        if "$ref" in schema:
            out += self.errors(value, self.resolve(schema["$ref"]), path)
        if "type" in schema:
            names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
            if not any(_type_ok(value, n) for n in names):
                return out + [(path, f"{json.dumps(value)[:80]} is not of type {' or '.join(names)}", False)]
        if "const" in schema and not _same(value, schema["const"]):
            out.append((path, f"{json.dumps(value)[:80]} is not {json.dumps(schema['const'])}", True))
        if "enum" in schema and not any(_same(value, e) for e in schema["enum"]):
            out.append((path, f"{json.dumps(value)[:80]} is not one of {json.dumps(schema['enum'])}", False))
        if isinstance(value, str):
            if "pattern" in schema and not re.search(schema["pattern"], value):
                out.append((path, f"{value[:80]!r} does not match {schema['pattern']}", False))
            if "minLength" in schema and len(value) < schema["minLength"]:
                out.append((path, f"shorter than {schema['minLength']}", False))
            if "maxLength" in schema and len(value) > schema["maxLength"]:
                out.append((path, f"longer than {schema['maxLength']} characters", False))
        if _type_ok(value, "number") and "minimum" in schema and value < schema["minimum"]:
            out.append((path, f"{value} is less than {schema['minimum']}", False))
        if isinstance(value, dict):
            for key in schema.get("required", []):
                if key not in value:
                    out.append((path, f"required property {key!r} is missing", False))
            props = schema.get("properties", {})
            for key, sub in value.items():
                child = f"{path}.{key}"
                if key in props:
                    out += self.errors(sub, props[key], child)
                elif "additionalProperties" in schema:
                    extra = schema["additionalProperties"]
                    if extra is False:
                        out.append((child, "additional property is not allowed", False))
                    else:
                        out += self.errors(sub, extra, child)
        if isinstance(value, list) and "items" in schema:
            for i, item in enumerate(value):
                out += self.errors(item, schema["items"], f"{path}[{i}]")
        if "not" in schema and not self.errors(value, schema["not"], path):
            out.append((path, f"must not match {json.dumps(schema['not'])[:80]}", False))
        for key in ("oneOf", "anyOf"):
            if key not in schema:
                continue
            results = [self.errors(value, s, path) for s in schema[key]]
            valid = sum(1 for r in results if not r)
            if key == "oneOf" and valid > 1:
                out.append((path, f"matches {valid} branches of oneOf, not exactly one", False))
            elif valid == 0:
                # Report the closest branch: fewest failed discriminators (const), then
                # fewest problems.
                best = min(results, key=lambda r: (sum(1 for e in r if e[2]), len(r)))
                out += best or [(path, f"matches no branch of {key}", False)]
        return out


def validate_file(recorded, schema_path, def_name=None):
    with open(schema_path, encoding="utf-8") as f:
        root = json.load(f)
    v = Validator(root)
    schema = v.resolve(f"#/$defs/{def_name}") if def_name else root
    problems = 0
    lines = 0
    with open(recorded, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            lines += 1
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                print(f"line {n}: not JSON: {e}")
                problems += 1
                continue
            value = record.get("body") if def_name else record
            for path, msg, _ in v.errors(value, schema):
                print(f"line {n}: {path}: {msg}")
                problems += 1
    return lines, problems


def _samples():
    span = {
        "span_id": "00f067aa0ba902b7", "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "parent_span_id": None, "name": "POST", "kind": "CLIENT",
        "start_time": 1736937045100000000, "end_time": 1736937045200000000, "duration_ns": 100000000,
        "attributes": {"http.method": "POST", "http.url": "https://api.example.com/v1"},
        "status": {"code": "UNSET", "description": None}, "events": [],
        "activity_id": "1", "request_body": "{}", "request_headers": {"content-type": "application/json"},
    }
    base = {"source": "workflow-telemetry", "workflow_id": "wf-1", "run_id": "r-1", "workflow_type": "W"}
    ts = "2026-01-15T10:30:45.123Z"
    act = dict(base, activity_id="1", activity_type="call_llm", task_queue="q", attempt=1, timestamp=ts)
    good = [
        dict(base, event_type="WorkflowStarted", task_queue="q", timestamp=ts),
        dict(base, event_type="WorkflowCompleted", workflow_output=None, timestamp=ts),
        dict(base, event_type="WorkflowFailed", timestamp=ts, error={
            "type": "ActivityError", "message": "Activity task failed",
            "cause": {"type": "ApplicationError", "message": "m", "error_type": "GovernanceBlock", "non_retryable": True},
            "root_cause": {"type": "ValueError", "message": "x"}}),
        dict(base, event_type="SignalReceived", task_queue="q", signal_name="go", signal_args=[1], timestamp=ts),
        dict(act, event_type="ActivityStarted", activity_input=[{"prompt": "hi"}]),
        dict(act, event_type="ActivityCompleted", status="completed", start_time=1736937045.1,
             end_time=1736937046.3, duration_ms=1200.4, span_count=1, spans=[span],
             activity_input=[{"prompt": "hi"}], activity_output={"text": "hello"}, error=None),
    ]
    hdr = {"authorization": "Bearer obx_test_x", "content-type": "application/json"}
    records_good = [{"method": "POST", "path": "/api/v1/governance/evaluate", "headers": hdr, "body": b} for b in good]
    records_good.append({"method": "POST", "path": "/api/v1/governance/approval", "headers": hdr,
                         "body": {"workflow_id": "w", "run_id": "r", "activity_id": "1"}})
    records_good.append({"method": "GET", "path": "/api/v1/auth/validate", "headers": hdr, "body": None})
    bad_span = dict(span, span_id="XYZ")
    records_bad = [
        ("bad span id", dict(records_good[5], body=dict(good[5], spans=[bad_span]))),
        ("extra field", dict(records_good[0], body=dict(good[0], extra=1))),
        ("missing field", dict(records_good[4], body={k: v for k, v in good[4].items() if k != "attempt"})),
        ("unknown event", dict(records_good[0], body=dict(good[0], event_type="Nope"))),
        ("bad timestamp", dict(records_good[1], body=dict(good[1], timestamp="2026-01-15T10:30:45Z"))),
        ("bool attempt", dict(records_good[4], body=dict(good[4], attempt=True))),
        ("no bearer", dict(records_good[6], headers={"content-type": "application/json"})),
        ("approval extra", dict(records_good[6], body={"workflow_id": "w", "run_id": "r", "activity_id": "1", "x": 1})),
        ("wrong route", dict(records_good[0], path="/api/v2/governance/evaluate")),
        ("failed error type", dict(records_good[5], body=dict(good[5], error={"type": "E"}))),
    ]
    # SDK 2.0 conventions (section 1.2, 2.2 notes), signed (section 1.3).
    v2 = {"authorization": "Bearer obx_test_x", "user-agent": "OpenBox-SDK/openbox-temporal-python-v2.0.0",
          "x-openbox-sdk-version": "openbox-temporal-python-v2.0.0",
          "x-openbox-agent-did": "did:aip:0f8e2c1a-6b7d-4e3f-9a21-5c4d3b2a1f00",
          "x-openbox-agent-timestamp": "2026-09-21T10:00:00.123456+00:00",
          "x-openbox-agent-nonce": "A" * 32, "x-openbox-agent-signature": "B" * 86 + "==",
          "x-openbox-body-sha256": "0" * 64}
    good_v2 = [dict(good[0], activity_input=[1, "x"], multi_agent_session_id="s-1"),
               dict(good[5], span_count=0, spans=[], multi_agent_session_id="s-1"),
               dict(good[2]),
               {"source": "workflow-telemetry", "event_type": "Handoff", "from_agent_did": "did:aip:x",
                "multi_agent_session_id": "s-1", "timestamp": ts}]
    ev2 = [{"method": "POST", "path": "/api/v1/governance/evaluate", "headers": v2, "body": b} for b in good_v2]
    records_good += ev2
    records_good.append({"method": "GET", "path": "/api/v1/auth/validate",
                         "headers": dict(v2, **{"content-type": "application/json"}), "body": None})
    records_bad += [
        ("2.0 with content-type on a POST", dict(ev2[0], headers=dict(v2, **{"content-type": "application/json"}))),
        ("2.0 failed ActivityCompleted", dict(ev2[1], body=dict(good_v2[1], status="failed"))),
        ("2.0 event under 1.0 headers", dict(ev2[0], headers=hdr)),
        ("1.0 headers naming 2.0", dict(records_good[0], headers=dict(hdr, **{"x-openbox-sdk-version": "x"}))),
        ("2.0 long cause message", dict(ev2[2], body=dict(good[2], error=dict(good[2]["error"], cause={
            "type": "ApplicationError", "message": "m" * 501})))),
        ("bad signature header", dict(ev2[0], headers=dict(v2, **{"x-openbox-agent-nonce": "short"}))),
        ("empty session id", dict(ev2[0], body=dict(good_v2[0], multi_agent_session_id=""))),
        ("2.0 WorkflowStarted without the workflow arguments", dict(ev2[0], body=good[0])),
        ("1.0 WorkflowStarted with the workflow arguments",
         dict(records_good[0], body=dict(good[0], activity_input=[1]))),
    ]
    sdk2_good, sdk2_bad = _sdk2_samples(good, hdr)
    hook_good, hook_bad = _hook_samples(act, ev2[0])
    return records_good + sdk2_good + hook_good, records_bad + sdk2_bad + hook_bad


def _hook_samples(act, v2_record):
    """Section 3.2 hook events: one started and one completed span per hook type."""
    common = {"span_id": "00f067aa0ba902b7", "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
              "parent_span_id": "00f067aa0ba902b8", "kind": "CLIENT", "start_time": 1736937045100000000,
              "attributes": {}, "events": []}
    started = dict(common, stage="started", end_time=None, duration_ns=None,
                   status={"code": "UNSET", "description": None}, error=None)
    completed = dict(common, stage="completed", end_time=1736937045200000000, duration_ns=100000000,
                     status={"code": "UNSET", "description": None}, error=None)
    http = {"hook_type": "http_request", "name": "POST", "http_method": "POST", "http_url": "https://a.example/v1",
            "request_headers": {"authorization": "[REDACTED]", "content-type": "application/json"},
            "request_body": "{}"}
    db = {"hook_type": "db_query", "name": "SELECT", "db_system": "postgresql", "db_name": "app",
          "db_operation": "SELECT", "db_statement": "SELECT 1", "server_address": "127.0.0.1", "server_port": 5432}
    file = {"hook_type": "file_operation", "name": "file.write", "kind": "INTERNAL", "file_path": "/tmp/x",
            "file_mode": "w", "file_operation": "write"}
    fn = {"hook_type": "function_call", "name": "function f", "kind": "INTERNAL", "function": "f", "module": "m",
          "args": {"args": [1], "kwargs": {}}}
    spans = [
        dict(started, **http, http_status_code=None, response_headers=None, response_body=None),
        dict(completed, **http, http_status_code=200, response_headers={"content-type": "application/json"},
             response_body="{}"),
        dict(started, **db, rowcount=None),
        dict(completed, **db, rowcount=1),
        dict(started, **file, bytes_read=None, bytes_written=None),
        dict(completed, **file, bytes_read=None, bytes_written=5),
        dict(started, **fn, result=None),
        dict(completed, **fn, result={"ok": True}),
    ]
    hook = dict(act, event_type="ActivityStarted", hook_trigger=True, activity_input=[], span_count=1)
    good = [dict(v2_record, body=dict(hook, spans=[s])) for s in spans]
    bad = [
        ("hook end_time at started", dict(good[0], body=dict(hook, spans=[dict(spans[0], end_time=1)]))),
        ("hook field missing", dict(good[1], body=dict(hook, spans=[
            {k: v for k, v in spans[1].items() if k != "response_body"}]))),
        ("hook header not redacted", dict(good[0], body=dict(hook, spans=[
            dict(spans[0], request_headers={"x-api-key": "k"})]))),
        ("hook rowcount at started", dict(good[2], body=dict(hook, spans=[dict(spans[2], rowcount=1)]))),
        ("hook of another type's fields", dict(good[4], body=dict(hook, spans=[dict(spans[4], db_system="x")]))),
        ("hook without hook_trigger", dict(good[0], body=dict(
            {k: v for k, v in hook.items() if k != "hook_trigger"}, spans=[spans[0]]))),
        ("2.0 ActivityCompleted with spans", dict(v2_record, body=dict(
            act, event_type="ActivityCompleted", status="completed", start_time=1.0, end_time=2.0,
            duration_ms=1000.0, span_count=1, spans=[spans[1]], activity_input=[], activity_output=None,
            error=None))),
    ]
    return good, bad


def _sdk2_samples(good, hdr):
    """SDK 2.0's additions (sections 2.2, 2.4): Handoff, and multi_agent_session_id on the
    other events (present only when set)."""
    def rec(body):
        return {"method": "POST", "path": "/api/v1/governance/evaluate", "headers": hdr, "body": body}

    handoff = {"source": "workflow-telemetry", "event_type": "Handoff", "from_agent_did": "did:example:a",
               "multi_agent_session_id": "s-1", "timestamp": "2026-01-15T10:30:45.123Z"}
    sdk2_good = [rec(handoff)] + [rec(dict(b, multi_agent_session_id="s-1")) for b in good]
    sdk2_bad = [
        ("handoff without from_agent_did", rec({k: v for k, v in handoff.items() if k != "from_agent_did"})),
        ("handoff with a blank session", rec(dict(handoff, multi_agent_session_id=" "))),
        ("handoff naming the receiver", rec(dict(handoff, agent_did="did:example:b"))),
        ("handoff with run fields", rec(dict(handoff, workflow_id="wf-1"))),
        ("null session", rec(dict(good[4], multi_agent_session_id=None))),
    ]
    return sdk2_good, sdk2_bad


def self_test(schema_path):
    with open(schema_path, encoding="utf-8") as f:
        v = Validator(json.load(f))
    good, bad = _samples()
    failures = 0
    for rec in good:
        errs = v.errors(rec, v.root)
        if errs:
            failures += 1
            print(f"FAIL good sample {rec['path']} {rec['body'] and rec['body'].get('event_type')}: {errs}")
    for name, rec in bad:
        if not v.errors(rec, v.root):
            failures += 1
            print(f"FAIL bad sample accepted: {name}")
    # The validator itself.
    small = Validator({"oneOf": [{"type": "integer"}, {"type": "number", "minimum": 10}]})
    checks = [
        (small.errors(3, small.root) == [], "integer branch"),
        (small.errors(2.5, small.root) != [], "2.5 matches neither"),
        (small.errors(12, small.root) != [], "12 matches both branches"),
        (small.errors(True, small.root) != [], "bool is not an integer"),
    ]
    for ok, what in checks:
        if not ok:
            failures += 1
            print(f"FAIL validator: {what}")
    total = len(good) + len(bad) + len(checks)
    print(f"{total - failures} passed, {failures} failed")
    return failures == 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("recorded", nargs="?", help="JSON-lines file written by fake_core.py --record")
    ap.add_argument("--schema", default=DEFAULT_SCHEMA)
    ap.add_argument("--def", dest="def_name", help="validate each line's body against $defs/NAME")
    ap.add_argument("--self-test", action="store_true")
    args = ap.parse_args()
    if args.self_test:
        sys.exit(0 if self_test(args.schema) else 1)
    if not args.recorded:
        ap.error("give a recorded-requests file, or --self-test")
    lines, problems = validate_file(args.recorded, args.schema, args.def_name)
    print(f"{lines} requests checked, {problems} problems")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
