"""Results of 100 000 bytes (beyond the agent's capture limit per call) between small
operations on one connection: the operations after them must still be seen. Where the
cut falls depends on how the reads split the result, so the big/after pair is repeated
ROUNDS (5) times.

Usage: client_bigresult.py postgres|mysql|redis|mongo PORT OUTDIR

  postgres (psycopg2, autocommit, user openbox, db shop):
      SELECT 'before-big'; ROUNDS x (SELECT repeat('z', 100000); SELECT 'after-big')
  mysql (PyMySQL, user openbox, db shop):
      SELECT 'before-big'; ROUNDS x (SELECT REPEAT('z', 100000); SELECT 'after-big')
  redis (db 0): SET big <100000 x>; ROUNDS x (GET big; GET after-big)
  mongo (db shop, collection big): insert {_id: 1, blob: <100000 z>};
      ROUNDS x (find {_id: 1}; find {_id: "after-big"})
Writes OUTDIR/ok at the end.
"""

import os
import sys

N = 100000
ROUNDS = 5


def main():
    kind, port, outdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if kind == "postgres":
        import psycopg2

        c = psycopg2.connect(host="127.0.0.1", port=port, user="openbox", dbname="shop",
                             sslmode="disable", gssencmode="disable")
        c.autocommit = True
        cur = c.cursor()
        for sql in ["SELECT 'before-big'"] + [f"SELECT repeat('z', {N})", "SELECT 'after-big'"] * ROUNDS:
            cur.execute(sql)
            cur.fetchall()
        c.close()
    elif kind == "mysql":
        import pymysql

        c = pymysql.connect(host="127.0.0.1", port=port, user="openbox", password="openbox-pw",
                            database="shop", autocommit=True)
        with c.cursor() as cur:
            for sql in ["SELECT 'before-big'"] + [f"SELECT REPEAT('z', {N})", "SELECT 'after-big'"] * ROUNDS:
                cur.execute(sql)
                cur.fetchall()
        c.close()
    elif kind == "redis":
        import redis

        r = redis.Redis(host="127.0.0.1", port=port)
        r.set("big", "x" * N)
        for _ in range(ROUNDS):
            assert len(r.get("big")) == N
            assert r.get("after-big") is None
        r.close()
    elif kind == "mongo":
        import pymongo

        m = pymongo.MongoClient("127.0.0.1", port, directConnection=True, serverSelectionTimeoutMS=20000)
        m.shop.big.insert_one({"_id": 1, "blob": "z" * N})
        for _ in range(ROUNDS):
            assert len(list(m.shop.big.find({"_id": 1}))) == 1
            assert list(m.shop.big.find({"_id": "after-big"})) == []
        m.close()
    else:
        sys.exit(f"unknown kind {kind}")
    open(os.path.join(outdir, "ok"), "w").close()


if __name__ == "__main__":
    main()
