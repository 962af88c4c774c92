"""MariaDB through PyMySQL (text protocol, COM_QUERY) as user `openbox` on database
`shop` (mariadb_server.py), autocommit on.

Usage: client_mysql.py PORT OUTDIR

Statements, in order:
  1. SELECT id, name FROM items WHERE id <= 2 ORDER BY id      -> 2 rows
  2. INSERT INTO items (id, name) VALUES (10, 'marker-ins')      -> 1 row
  3. UPDATE items SET name = 'marker-upd' WHERE id >= 2          -> 3 rows
  4. SELECT * FROM missing_table_marker                          -> error 1146
  5. DELETE FROM items WHERE id = 10                             -> 1 row
Writes OUTDIR/result.json: [{"statement", "rowcount"} or {"statement", "error_code",
"error_message"}] in order.
"""

import json
import os
import sys

import pymysql

STATEMENTS = [
    "SELECT id, name FROM items WHERE id <= 2 ORDER BY id",
    "INSERT INTO items (id, name) VALUES (10, 'marker-ins')",
    "UPDATE items SET name = 'marker-upd' WHERE id >= 2",
    "SELECT * FROM missing_table_marker",
    "DELETE FROM items WHERE id = 10",
]


def main():
    port, outdir = int(sys.argv[1]), sys.argv[2]
    conn = pymysql.connect(host="127.0.0.1", port=port, user="openbox", password="openbox-pw",
                           database="shop", autocommit=True, connect_timeout=20)
    out = []
    try:
        with conn.cursor() as cur:
            for sql in STATEMENTS:
                try:
                    n = cur.execute(sql)
                    out.append({"statement": sql, "rowcount": n})
                except pymysql.MySQLError as e:
                    out.append({"statement": sql, "error_code": e.args[0], "error_message": e.args[1]})
    finally:
        conn.close()
    assert [o.get("rowcount") for o in out] == [2, 1, 3, None, 1], out
    assert out[3]["error_code"] == 1146, out
    with open(os.path.join(outdir, "result.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
