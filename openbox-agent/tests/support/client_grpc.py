"""gRPC calls with grpcio against grpc_server.py in cleartext, on one channel (one
HTTP/2 connection), one after the other.

Usage: client_grpc.py PORT OUTDIR

Writes OUTDIR/result.json: one object per call, in order, with what the client sent and
got: {"method" (/openbox.test.Echo/<Method>), "code" (the gRPC status number), "details",
"sent" and "received" (the serialized size of each message, in order), "values" (the
values received)}. An unexpected status fails the script.

The calls: Unary("hello"), Split("one two three") (server streaming), Join of four
values (client streaming), Fail("x") (NOT_FOUND).
"""

import json
import os
import sys

import grpc
from google.protobuf.wrappers_pb2 import StringValue

SERVICE = "/openbox.test.Echo/"


def main():
    port, out = sys.argv[1], sys.argv[2]
    results = []
    codec = dict(
        request_serializer=StringValue.SerializeToString,
        response_deserializer=StringValue.FromString,
    )

    def record(method, sent, received, code, details):
        results.append({
            "method": SERVICE + method,
            "code": code.value[0],
            "details": details,
            "sent": [m.ByteSize() for m in sent],
            "received": [m.ByteSize() for m in received],
            "values": [m.value for m in received],
        })

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        req = StringValue(value="hello")
        reply, call = channel.unary_unary(SERVICE + "Unary", **codec).with_call(req, timeout=30)
        record("Unary", [req], [reply], call.code(), call.details())

        req = StringValue(value="one two three")
        call = channel.unary_stream(SERVICE + "Split", **codec)(req, timeout=30)
        replies = list(call)
        record("Split", [req], replies, call.code(), call.details())

        reqs = [StringValue(value=v) for v in ["a", "bb", "ccc", "dddd"]]
        reply, call = channel.stream_unary(SERVICE + "Join", **codec).with_call(
            iter(reqs), timeout=30
        )
        record("Join", reqs, [reply], call.code(), call.details())

        req = StringValue(value="x")
        try:
            channel.unary_unary(SERVICE + "Fail", **codec)(req, timeout=30)
            sys.exit("Fail did not fail")
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise
            record("Fail", [req], [], e.code(), e.details())

    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
