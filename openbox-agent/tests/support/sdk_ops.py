"""One script, run in the SDK's virtualenv (target/test-env/sdk-venv), that does HTTP,
database and file operations — optionally with the in-process SDK's instrumentation on,
so its spans can be set beside the agent's for the same operations.

Usage: sdk_ops.py --http BASE_URL --pg PORT --mysql PORT --redis PORT --mongo PORT
                  --dir DIR [--sdk OUT.json]

--sdk: set up openbox-temporal-sdk-python 1.0.0 exactly as `create_openbox_worker` does
(sdk_setup.py: a WorkflowSpanProcessor, then `setup_opentelemetry_for_governance` with
databases and file I/O instrumented), and run the operations inside an `activity.<type>` span the way
its activity interceptor does (attributes temporal.workflow_id/activity_id, trace
registered with the processor, pending bodies propagated to child spans at the end). No
Temporal server is involved: the interceptor's span handling is mimicked, not the
worker. The spans the SDK would have sent in ActivityCompleted are written to OUT.json.

Operations (in order; `sdk-` markers make every one unique):
  httpx     GET /json/sdk-httpx?q=1 (Authorization: Bearer sk-sdk), POST /echo/sdk-httpx
  requests  GET /json/sdk-requests?q=1, POST /echo/sdk-requests (JSON body)
  urllib3   GET /status/500/sdk-urllib3
  psycopg2  SELECT id, name FROM items WHERE id <= 2 ORDER BY id; SELECT * FROM missing_sdk_table
  asyncpg   SELECT name FROM items WHERE id = $1
  pymysql   SELECT id, name FROM items WHERE id <= 2 ORDER BY id
  redis     SET sdk:key v; GET sdk:key
  pymongo   insert_one, find (collection sdk_items)
  files     open(DIR/sdk.txt, "w").write(5000 chars); open(DIR/sdk.txt).read()
"""

import argparse
import asyncio
import json
import os
import sys


def operations(a):
    import asyncpg
    import httpx
    import psycopg2
    import pymongo
    import pymysql
    import redis
    import requests
    import urllib3

    urllib3.disable_warnings()
    base = a.http.rstrip("/")
    with httpx.Client(verify=False) as c:
        c.get(f"{base}/json/sdk-httpx?q=1", headers={"Authorization": "Bearer sk-sdk"})
        c.post(f"{base}/echo/sdk-httpx", content=b"httpx-body", headers={"Content-Type": "text/plain"})
    with requests.Session() as s:
        s.get(f"{base}/json/sdk-requests?q=1", verify=False)
        s.post(f"{base}/echo/sdk-requests", json={"marker": "sdk-requests"}, verify=False)
    with urllib3.PoolManager(cert_reqs="CERT_NONE") as pool:
        pool.request("GET", f"{base}/status/500/sdk-urllib3", retries=False)

    conn = psycopg2.connect(host="127.0.0.1", port=a.pg, user="openbox", dbname="shop",
                            sslmode="disable", gssencmode="disable")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT id, name FROM items WHERE id <= 2 ORDER BY id")
        cur.fetchall()
        try:
            cur.execute("SELECT * FROM missing_sdk_table")
        except psycopg2.Error:
            pass
    conn.close()

    async def apg():
        c = await asyncpg.connect(host="127.0.0.1", port=a.pg, user="openbox", database="shop", ssl=False)
        await c.fetch("SELECT name FROM items WHERE id = $1", 1)
        await c.close()

    asyncio.run(apg())

    m = pymysql.connect(host="127.0.0.1", port=a.mysql, user="openbox", password="openbox-pw",
                        database="shop", autocommit=True)
    with m.cursor() as cur:
        cur.execute("SELECT id, name FROM items WHERE id <= 2 ORDER BY id")
        cur.fetchall()
    m.close()

    r = redis.Redis(host="127.0.0.1", port=a.redis, db=0)
    r.set("sdk:key", "v")
    r.get("sdk:key")
    r.close()

    mc = pymongo.MongoClient("127.0.0.1", a.mongo, directConnection=True, serverSelectionTimeoutMS=20000)
    mc.shop.sdk_items.insert_one({"_id": 1, "tag": "sdk"})
    list(mc.shop.sdk_items.find({"tag": "sdk"}))
    mc.close()

    path = os.path.join(a.dir, "sdk.txt")
    with open(path, "w") as f:
        f.write("s" * 5000)
    with open(path) as f:
        f.read()


def with_sdk(a):
    import sdk_setup

    processor = sdk_setup.instrument(instrument_databases=True, db_libraries=None,
                                     instrument_file_io=True)
    activity_id = "1"
    with sdk_setup.activity(processor, "wf-sdk-ops", "SdkOps", "sdk_ops", activity_id) as (buffer, span):
        operations(a)
        spans = [s for s in buffer.spans
                 if s.get("activity_id") == activity_id
                 or s.get("attributes", {}).get("temporal.activity_id") == activity_id]
        pending = processor.get_pending_body(span.get_span_context().span_id)
        if pending:
            for s in spans:
                for key in ("request_body", "response_body", "request_headers", "response_headers"):
                    if key not in s and pending.get(key):
                        s[key] = pending[key]
    with open(a.sdk, "w") as f:
        json.dump(spans, f, default=str)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--http", required=True)
    for name in ("pg", "mysql", "redis", "mongo"):
        p.add_argument(f"--{name}", type=int, required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--sdk")
    a = p.parse_args()
    if a.sdk:
        with_sdk(a)
    else:
        operations(a)


if __name__ == "__main__":
    main()
