"""Redis through redis-py: sync, asyncio, or a non-transactional pipeline; database 3.

Usage: client_redis.py sync|asyncio|pipeline PORT OUTDIR

sync / asyncio: one connection, these commands in order (M = mode):
  1. SET M:marker hello            -> OK
  2. GET M:marker                  -> "hello"
  3. INCR M:counter                -> 1
  4. INCR M:counter                -> 2
  5. LPUSH M:marker x              -> WRONGTYPE error
  6. DEL M:marker                  -> 1
  7. GET M:missing                 -> nil
pipeline (transaction=False, raise_on_error=False): the five commands are written
together and their replies read afterwards:
  1. SET p:str one                 -> OK
  2. LPUSH p:str x                 -> WRONGTYPE error
  3. INCR p:n                      -> 1
  4. GET p:str                     -> "one"
  5. RPUSH p:list a b c            -> 3
Writes OUTDIR/result.json: [{"command": [args…], "reply": … or "error": message}].
redis-py's connection set-up (CLIENT SETINFO …, SELECT 3) is not listed there.
"""

import asyncio
import json
import os
import sys

import redis


def plan(mode):
    return [
        ["SET", f"{mode}:marker", "hello"],
        ["GET", f"{mode}:marker"],
        ["INCR", f"{mode}:counter"],
        ["INCR", f"{mode}:counter"],
        ["LPUSH", f"{mode}:marker", "x"],
        ["DEL", f"{mode}:marker"],
        ["GET", f"{mode}:missing"],
    ]


PIPELINE = [
    ["SET", "p:str", "one"],
    ["LPUSH", "p:str", "x"],
    ["INCR", "p:n"],
    ["GET", "p:str"],
    ["RPUSH", "p:list", "a", "b", "c"],
]


def record(cmd, reply):
    if isinstance(reply, Exception):
        return {"command": cmd, "error": str(reply)}
    if isinstance(reply, bytes):
        reply = reply.decode()
    return {"command": cmd, "reply": reply}


def run_sync(port):
    r = redis.Redis(host="127.0.0.1", port=port, db=3, socket_timeout=20)
    out = []
    for cmd in plan("sync"):
        try:
            out.append(record(cmd, r.execute_command(*cmd)))
        except redis.ResponseError as e:
            out.append(record(cmd, e))
    r.close()
    return out


async def run_asyncio(port):
    import redis.asyncio as aredis

    r = aredis.Redis(host="127.0.0.1", port=port, db=3, socket_timeout=20)
    out = []
    for cmd in plan("asyncio"):
        try:
            out.append(record(cmd, await r.execute_command(*cmd)))
        except redis.ResponseError as e:
            out.append(record(cmd, e))
    await r.aclose()
    return out


def run_pipeline(port):
    r = redis.Redis(host="127.0.0.1", port=port, db=3, socket_timeout=20)
    # Connect (and run the set-up commands) first, so only the pipeline is batched.
    r.ping()
    pipe = r.pipeline(transaction=False)
    for cmd in PIPELINE:
        pipe.execute_command(*cmd)
    replies = pipe.execute(raise_on_error=False)
    r.close()
    return [record(cmd, reply) for cmd, reply in zip(PIPELINE, replies)]


def main():
    mode, port, outdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if mode == "sync":
        out = run_sync(port)
    elif mode == "asyncio":
        out = asyncio.run(run_asyncio(port))
    elif mode == "pipeline":
        out = run_pipeline(port)
    else:
        sys.exit(f"unknown mode {mode}")
    errors = [i for i, o in enumerate(out) if "error" in o]
    assert errors == ([1] if mode == "pipeline" else [4]), out
    assert out[errors[0]]["error"].startswith("WRONGTYPE"), out
    with open(os.path.join(outdir, "result.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
