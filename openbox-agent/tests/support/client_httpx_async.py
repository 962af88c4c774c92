"""httpx.AsyncClient over HTTPS (asyncio: TLS through memory BIOs, so the SSL object has
no fd). One client, so one keep-alive connection; three requests, one a POST with a body.

Usage: client_httpx_async.py PORT OUTDIR
Writes OUTDIR/ok once every response body checked out.
"""

import asyncio
import os
import sys

import httpx

POST_BODY = b"".join(b"httpx-body-%05d\n" % i for i in range(400))[:6000]


async def main():
    port, outdir = int(sys.argv[1]), sys.argv[2]
    base = f"https://127.0.0.1:{port}"
    async with httpx.AsyncClient(verify=False, http2=False) as client:
        r1 = await client.get(f"{base}/httpx/first?marker=httpx-get")
        r2 = await client.post(f"{base}/httpx/post", content=POST_BODY, headers={"Content-Type": "text/plain"})
        r3 = await client.get(f"{base}/httpx/third")
    assert r1.text == "echo:GET /httpx/first?marker=httpx-get 0", r1.text
    assert r2.text == f"echo:POST /httpx/post {len(POST_BODY)}", r2.text
    assert r3.text == "echo:GET /httpx/third 0", r3.text
    open(os.path.join(outdir, "ok"), "w").close()


if __name__ == "__main__":
    asyncio.run(main())
