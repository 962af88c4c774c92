"""MongoDB wire protocol (OP_MSG) through pymongo against FerretDB (ferretdb_server.py).

Usage: client_mongo.py PORT OUTDIR

Commands on database `shop`, collection `items_marker`, in order:
  1. insert   (insert_one {_id: 1, n: 1, tag: "marker-one"})
  2. insert   (insert_many: _id 2, 3, 4)
  3. find     ({n: {$gte: 2}})                       -> 3 documents
  4. update   (update_many {n: {$gte: 3}} $set tag)  -> 2 modified
  5. delete   (delete_one {_id: 4})                   -> 1 deleted
  6. notARealCommand  (db.command)                    -> error, code 59 "no such command"
Writes OUTDIR/result.json: [{"command", "result"} or {"command", "error_code", "error"}].
pymongo's handshake (hello/isMaster), its monitor connection and endSessions are
not listed there.
"""

import json
import os
import sys

import pymongo
from pymongo.errors import OperationFailure


def main():
    port, outdir = int(sys.argv[1]), sys.argv[2]
    client = pymongo.MongoClient("127.0.0.1", port, directConnection=True,
                                 serverSelectionTimeoutMS=20000)
    coll = client.shop.items_marker
    out = []
    coll.insert_one({"_id": 1, "n": 1, "tag": "marker-one"})
    out.append({"command": "insert", "result": 1})
    coll.insert_many([{"_id": i, "n": i, "tag": f"marker-{i}"} for i in (2, 3, 4)])
    out.append({"command": "insert", "result": 3})
    docs = list(coll.find({"n": {"$gte": 2}}))
    out.append({"command": "find", "result": len(docs)})
    res = coll.update_many({"n": {"$gte": 3}}, {"$set": {"tag": "marker-upd"}})
    out.append({"command": "update", "result": res.modified_count})
    res = coll.delete_one({"_id": 4})
    out.append({"command": "delete", "result": res.deleted_count})
    try:
        client.shop.command("notARealCommand")
        raise AssertionError("an unknown command succeeded")
    except OperationFailure as e:
        out.append({"command": "notARealCommand", "error_code": e.code,
                    "error": e.details.get("errmsg", str(e))})
    client.close()
    assert [o.get("result") for o in out] == [1, 3, 3, 2, 1, None], out
    with open(os.path.join(outdir, "result.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
