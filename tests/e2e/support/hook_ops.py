"""The hook-events end-to-end test's activity (registered by gov_worker.py).

`gov_ops(p)` (async) does one of each operation SDK 2.0 governs, in this order, every
one carrying the activity's marker `m = p["marker"]` (`https_base` is tls_server.py):
1. requests: `POST {https_base}/json/{m}/requests` with JSON body `{"m": m}` and the
   headers `Authorization: Bearer secret-{m}`, `X-Api-Key: key-{m}`;
2. httpx (async): `GET {https_base}/cookie/{m}/httpx` (answered with `Set-Cookie`);
3. aiohttp: `GET {https_base}/status/503/{m}/aiohttp` (answered 503);
4. a `curl` subprocess: `GET {https_base}/e2e/{m}/curl`;
5. psycopg2 over TLS: `SELECT '{m}-psycopg2'::text AS marker`;
6. asyncpg over TLS: `SELECT '{m}-asyncpg'::text AS marker`;
7. writes then reads `{dir}/{m}.txt`;
8. `score(m, weight=3)`, a `@traced` function.
It returns what each operation gave, so the test can compare Core's view with it.
"""

import os
import ssl
import subprocess

import aiohttp
import asyncpg
import httpx
import psycopg2
import requests
from temporalio import activity

from openbox_hook import traced


@traced
def score(marker, weight=1):
    return {"marker": marker, "score": len(marker) * weight}


def _pg_ssl():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@activity.defn
async def gov_ops(p: dict) -> dict:
    m, base = p["marker"], p["https_base"]
    out = {}
    r = requests.post(f"{base}/json/{m}/requests", json={"m": m}, verify=False, timeout=60,
                      headers={"Authorization": f"Bearer secret-{m}", "X-Api-Key": f"key-{m}"})
    out["requests"] = {"status": r.status_code, "body": r.text}
    async with httpx.AsyncClient(verify=False) as client:
        r = await client.get(f"{base}/cookie/{m}/httpx")
    out["httpx"] = {"status": r.status_code, "body": r.text}
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/status/503/{m}/aiohttp", ssl=False) as r:
            out["aiohttp"] = {"status": r.status, "body": await r.text()}
    done = subprocess.run(["curl", "-sk", "--max-time", "60", f"{base}/e2e/{m}/curl"],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"curl exited {done.returncode}: {done.stderr}")
    out["curl"] = {"body": done.stdout}
    conn = psycopg2.connect(host="127.0.0.1", port=p["pg_port"], user="openbox", dbname="shop",
                            sslmode="require", gssencmode="disable", connect_timeout=60)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"SELECT '{m}-psycopg2'::text AS marker")
            out["psycopg2"] = cur.fetchone()[0]
    finally:
        conn.close()
    aconn = await asyncpg.connect(host="127.0.0.1", port=p["pg_port"], user="openbox",
                                  database="shop", ssl=_pg_ssl(), timeout=60)
    try:
        out["asyncpg"] = await aconn.fetchval(f"SELECT '{m}-asyncpg'::text AS marker")
    finally:
        await aconn.close()
    path = os.path.join(p["dir"], f"{m}.txt")
    text = f"written by the activity of {m}\n"
    with open(path, "w") as f:
        f.write(text)
    with open(path) as f:
        out["file"] = {"path": path, "read": f.read()}
    out["score"] = score(m, weight=3)
    return out
