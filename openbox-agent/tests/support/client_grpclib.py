"""gRPC calls over TLS with grpclib (pure Python on h2 and the standard ssl module, so
libssl: the agent sees the plaintext) against grpc_server.py --tls, on one channel.

Usage: client_grpclib.py PORT OUTDIR

The same calls and the same OUTDIR/result.json as client_grpc.py (which uses grpcio,
whose BoringSSL the agent cannot see): Unary("hello"), Split("one two three"), Join of
four values, Fail("x") (NOT_FOUND). The server's self-signed certificate is not
verified.
"""

import asyncio
import json
import os
import ssl
import sys

from google.protobuf.wrappers_pb2 import StringValue
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError

SERVICE = "/openbox.test.Echo/"


async def call(channel, method, cardinality, requests):
    """Sends `requests`, returns (replies, status number, details)."""
    replies = []
    async with channel.request(SERVICE + method, cardinality, StringValue, StringValue) as stream:
        for i, req in enumerate(requests):
            await stream.send_message(req, end=i == len(requests) - 1)
        try:
            while (reply := await stream.recv_message()) is not None:
                replies.append(reply)
            await stream.recv_trailing_metadata()
        except GRPCError as e:
            return replies, e.status.value, e.message or ""
    return replies, Status.OK.value, ""


async def run(port):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    results = []
    calls = [
        ("Unary", Cardinality.UNARY_UNARY, ["hello"], 0),
        ("Split", Cardinality.UNARY_STREAM, ["one two three"], 0),
        ("Join", Cardinality.STREAM_UNARY, ["a", "bb", "ccc", "dddd"], 0),
        ("Fail", Cardinality.UNARY_UNARY, ["x"], Status.NOT_FOUND.value),
    ]
    async with Channel("127.0.0.1", port, ssl=ctx) as channel:
        for method, cardinality, values, want in calls:
            sent = [StringValue(value=v) for v in values]
            received, code, details = await call(channel, method, cardinality, sent)
            if code != want:
                sys.exit(f"{method} ended with status {code} ({details}), expected {want}")
            results.append({
                "method": SERVICE + method,
                "code": code,
                "details": details,
                "sent": [m.ByteSize() for m in sent],
                "received": [m.ByteSize() for m in received],
                "values": [m.value for m in received],
            })
    return results


def main():
    port, out = int(sys.argv[1]), sys.argv[2]
    results = asyncio.run(run(port))
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
