"""Writes the HTTP/2 recordings of the parser's unit tests (`C <hex>` / `S <hex>` lines).

Two in-memory h2 connections talk to each other, so the header blocks are what a real
encoder produces: Huffman-coded strings and dynamic-table references across streams.
Run with a Python that has `h2` (4.x): python record.py (from this directory).
"""

import struct

import h2.config
import h2.connection


def grpc(*messages: bytes) -> bytes:
    return b"".join(b"\0" + struct.pack(">I", len(m)) + m for m in messages)


def session(name, exchanges):
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding=None)
    )
    lines = []

    def flush():
        for side, conn, peer in (("C", client, server), ("S", server, client)):
            data = conn.data_to_send()
            if data:
                lines.append(f"{side} {data.hex()}")
                peer.receive_data(data)

    client.initiate_connection()
    server.initiate_connection()
    flush()
    flush()
    for ex in exchanges:
        sid = client.get_next_available_stream_id()
        body = ex.get("body")
        client.send_headers(sid, ex["request"], end_stream=body is None)
        if body is not None:
            client.send_data(sid, body, end_stream=True, pad_length=ex.get("pad"))
        flush()
        server.send_headers(sid, ex["response"], end_stream=False)
        for chunk in ex.get("response_body", []):
            server.send_data(sid, chunk, end_stream=False)
            flush()
        if ex.get("trailers"):
            server.send_headers(sid, ex["trailers"], end_stream=True)
        else:
            server.end_stream(sid)
        flush()
    with open(name, "w") as f:
        f.write("\n".join(lines) + "\n")


req = [
    (":method", "POST"),
    (":scheme", "https"),
    (":authority", "api.example"),
    (":path", "/v1/chat?key=secret"),
    ("content-type", "application/json"),
    ("authorization", "Bearer sk-secret"),
    ("user-agent", "python-httpx/0.28.1"),
]
session(
    "rest.rec",
    [
        {
            "request": req,
            "body": b'{"q":"hello"}',
            "pad": 3,
            "response": [(":status", "200"), ("content-type", "application/json")],
            "response_body": [b'{"a":', b'"hi"}'],
        },
        {
            # The same headers again: a real encoder sends dynamic-table indices.
            "request": [(k, v) for k, v in req if k != "content-type"][:3]
            + [(":path", "/missing"), ("user-agent", "python-httpx/0.28.1")],
            "response": [(":status", "404"), ("content-type", "text/plain")],
            "response_body": [b"not found"],
        },
    ],
)

call = [
    (":method", "POST"),
    (":scheme", "http"),
    (":authority", "localhost:50051"),
    (":path", "/helloworld.Greeter/SayHello"),
    ("content-type", "application/grpc"),
    ("te", "trailers"),
    ("grpc-accept-encoding", "identity,deflate,gzip"),
]
session(
    "grpc.rec",
    [
        {
            "request": call,
            "body": grpc(b"\n\x05world"),
            "response": [(":status", "200"), ("content-type", "application/grpc")],
            "response_body": [grpc(b"\n\x0bHello world")],
            "trailers": [("grpc-status", "0"), ("grpc-message", "")],
        },
        {
            # Server streaming: three replies in two DATA frames, one split mid-message.
            "request": [(k, "/helloworld.Greeter/SayHelloStream") if k == ":path" else (k, v) for k, v in call],
            "body": grpc(b"\n\x03you"),
            "response": [(":status", "200"), ("content-type", "application/grpc")],
            "response_body": [grpc(b"\n\x01a", b"\n\x02bb")[:9], grpc(b"\n\x01a", b"\n\x02bb")[9:] + grpc(b"\n\x03ccc")],
            "trailers": [("grpc-status", "0")],
        },
        {
            "request": [(k, "/helloworld.Greeter/Fail") if k == ":path" else (k, v) for k, v in call],
            "body": grpc(b""),
            "response": [(":status", "200"), ("content-type", "application/grpc")],
            "trailers": [("grpc-status", "5"), ("grpc-message", "no such greeting")],
        },
    ],
)


def h2c_session(name):
    """`Upgrade: h2c` (RFC 7540 §3.2): an HTTP/1.1 GET asking to switch, the server's 101
    and then its HTTP/2 answer on stream 1, the client's preface, and a second request
    on stream 3 over HTTP/2 proper."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding=None)
    )
    settings = client.initiate_upgrade_connection()
    upgrade = (
        "GET /first?x=1 HTTP/1.1\r\nHost: h2c.example:8080\r\nUser-Agent: curl/7.88.1\r\n"
        "Accept: */*\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        f"HTTP2-Settings: {settings.decode()}\r\nAuthorization: Bearer up-secret\r\n\r\n"
    ).encode()
    lines = [f"C {upgrade.hex()}"]
    server.initiate_upgrade_connection(settings)
    switching = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
    server.send_headers(1, [(":status", "200"), ("content-type", "text/plain")])
    server.send_data(1, b"first answer", end_stream=True)
    lines.append(f"S {(switching + server.data_to_send()).hex()}")
    client.receive_data(bytes.fromhex(lines[-1][2:])[len(switching):])
    lines.append(f"C {client.data_to_send().hex()}")
    server.receive_data(bytes.fromhex(lines[-1][2:]))
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, [(":method", "POST"), (":scheme", "http"),
                              (":authority", "h2c.example:8080"), (":path", "/second"),
                              ("content-type", "text/plain")])
    client.send_data(sid, b"second body", end_stream=True)
    lines.append(f"C {client.data_to_send().hex()}")
    server.receive_data(bytes.fromhex(lines[-1][2:]))
    server.send_headers(sid, [(":status", "201"), ("content-type", "text/plain")])
    server.send_data(sid, b"second answer", end_stream=True)
    lines.append(f"S {server.data_to_send().hex()}")
    client.receive_data(bytes.fromhex(lines[-1][2:]))
    with open(name, "w") as f:
        f.write("\n".join(lines) + "\n")


h2c_session("h2c.rec")
