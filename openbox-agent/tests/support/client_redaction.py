"""Requests carrying every secret of issue 10's redaction list, on one keep-alive
connection to redaction_server.py, then (with a PostgreSQL port) an ALTER ROLE with a
password.

Usage: client_redaction.py HTTP_PORT [PG_PORT]

Every secret value contains `S3CRET`; everything else is plain. The requests are
REQUESTS below (method, target, headers, body); the test holds the same list.
"""

import http.client
import sys

REQUESTS = [
    ("GET", "/query?access_token=S3CRET-q1&page=2",
     {"X-Goog-Api-Key": "S3CRET-h1", "Private-Token": "S3CRET-h2",
      "Authorization": "Bearer S3CRET-h3", "Cookie": "sid=S3CRET-h4",
      "X-Marker": "visible-req"}, None),
    ("GET", "/query2?api_key=S3CRET-q2&q=plain", {}, None),
    ("POST", "/form", {"Content-Type": "application/x-www-form-urlencoded"},
     b"user=ann&password=S3CRET-f1&remember=1"),
    ("POST", "/json", {"Content-Type": "application/json"},
     b'{"user": "ann", "auth": {"token": "S3CRET-j1"}, '
     b'"items": [{"token": "S3CRET-j2", "n": 1}], "max_tokens": 5}'),
    ("POST", "/truncated", {"Content-Type": "application/json"},
     b'{"a": [1, 2], "token": "S3CRET-j3'),
]


def main():
    port = int(sys.argv[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    for method, target, headers, body in REQUESTS:
        conn.request(method, target, body=body, headers=headers)
        r = conn.getresponse()
        r.read()
        assert r.status == 200, (target, r.status)
    conn.close()
    if len(sys.argv) > 2:
        import psycopg2

        pg = psycopg2.connect(host="127.0.0.1", port=int(sys.argv[2]), user="openbox",
                              dbname="shop", sslmode="disable", gssencmode="disable",
                              connect_timeout=20)
        pg.autocommit = True
        with pg.cursor() as cur:
            cur.execute("ALTER ROLE openbox PASSWORD 'S3CRET-pg'")
        pg.close()


if __name__ == "__main__":
    main()
