"""gRPC test server on 127.0.0.1, with grpcio's generic handlers: no generated code.
Messages are protobuf `google.protobuf.StringValue`s.

Usage: grpc_server.py [--tls]    (the chosen port is the first line on stdout)

Cleartext, or with --tls a self-signed certificate (ALPN h2, as gRPC requires).

Service `openbox.test.Echo`:
    Unary(StringValue) -> StringValue           "echo:<value>"
    Fail(StringValue) -> error                  NOT_FOUND, details "no such thing: <value>"
    Split(StringValue) -> stream StringValue    one message per space-separated word
    Join(stream StringValue) -> StringValue     the values joined by "+"
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from concurrent import futures

import grpc
from google.protobuf.wrappers_pb2 import StringValue

SERVICE = "openbox.test.Echo"


def unary(request, context):
    return StringValue(value="echo:" + request.value)


def fail(request, context):
    context.abort(grpc.StatusCode.NOT_FOUND, "no such thing: " + request.value)


def split(request, context):
    for word in request.value.split(" "):
        yield StringValue(value=word)


def join(requests, context):
    return StringValue(value="+".join(r.value for r in requests))


def self_signed(directory):
    cert = os.path.join(directory, "cert.pem")
    key = os.path.join(directory, "key.pem")
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    with open(key, "rb") as k, open(cert, "rb") as c:
        return k.read(), c.read()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tls", action="store_true")
    args = ap.parse_args()
    codec = dict(
        request_deserializer=StringValue.FromString,
        response_serializer=StringValue.SerializeToString,
    )
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary, **codec),
            "Fail": grpc.unary_unary_rpc_method_handler(fail, **codec),
            "Split": grpc.unary_stream_rpc_method_handler(split, **codec),
            "Join": grpc.stream_unary_rpc_method_handler(join, **codec),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    if args.tls:
        certdir = tempfile.mkdtemp(prefix="openbox-grpc-server-")
        try:
            creds = grpc.ssl_server_credentials([self_signed(certdir)])
        finally:
            shutil.rmtree(certdir, ignore_errors=True)
        port = server.add_secure_port("127.0.0.1:0", creds)
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(port, flush=True)
    stop.wait()
    server.stop(grace=1).wait()


if __name__ == "__main__":
    sys.exit(main())
