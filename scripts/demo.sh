#!/usr/bin/env bash
# The main job on a local default: Valkey 9.1 with the module, a local S3 (SeaweedFS), sample flows
# written as the Argyll engine writes them (event logs, no snapshots), one archive of each terminal flow,
# then the object, the index and the engine's state (live and archived) read back.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh >/dev/null
source target/testbed.env
cargo build --release --locked
bash scripts/s3.sh start
: "${FLOWARCHIVE_S3_KEY:=flowarchive-test-key}"
: "${FLOWARCHIVE_S3_SECRET:=flowarchive-test-secret-9f3b}"
port=${FLOWARCHIVE_DEMO_PORT:-16379}
dir=target/demo
rm -rf "$dir" && mkdir -p "$dir"

python3 - "$FLOWARCHIVE_S3_KEY" "$FLOWARCHIVE_S3_SECRET" <<'PY'
# Create the demo bucket (signed request, as SeaweedFS requires).
import sys, boto3, botocore
s3 = boto3.client("s3", endpoint_url="http://127.0.0.1:18333", aws_access_key_id=sys.argv[1],
                  aws_secret_access_key=sys.argv[2], region_name="us-east-1")
try:
    s3.create_bucket(Bucket="flowarchive-demo")
except botocore.exceptions.ClientError as e:
    if e.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
        raise
PY

AWS_ACCESS_KEY_ID=$FLOWARCHIVE_S3_KEY AWS_SECRET_ACCESS_KEY=$FLOWARCHIVE_S3_SECRET \
"$FLOWARCHIVE_VALKEY9" --port "$port" --bind 127.0.0.1 --dir "$PWD/$dir" --save "" --daemonize yes \
  --logfile "$PWD/$dir/valkey.log" --pidfile "$PWD/$dir/valkey.pid" \
  --loadmodule "$PWD/target/release/libflowarchive.so" \
  endpoint http://127.0.0.1:18333 bucket flowarchive-demo path-style yes prefix demo retention 7d
trap 'kill "$(cat "$dir/valkey.pid")" 2>/dev/null || true' EXIT
for _ in $(seq 1 50); do python3 -c "import redis; redis.Redis(port=$port).ping()" 2>/dev/null && break; sleep 0.1; done

python3 - "$port" <<'PY'
import gzip, json, sys, time, redis, boto3, os
r = redis.Redis(port=int(sys.argv[1]), decode_responses=True)
now = int(time.time() * 1000)
day = 86_400_000
flows = [("order-1001", "completed", now - 40 * day), ("order-1002", "failed", now - 9 * day),
         ("order-1003", "completed", now - 1 * day), ("order-1004", "active", now - 60 * day),
         ("order-1001:ship:tok-7", "completed", now - 30 * day)]
plan = {"goals": ["ship"], "required": ["order_id"],
        "steps": {"ship": {"id": "ship", "name": "Ship", "type": "script",
                           "attributes": {"order_id": {"role": "required", "type": "string"},
                                          "receipt": {"role": "output", "type": "string"}},
                           "script": {"language": "ale", "script": "\"r-77\""}}},
        "attributes": {"order_id": {"providers": [], "consumers": ["ship"]},
                       "receipt": {"providers": ["ship"], "consumers": []}},
        "excluded": {}}

def ts(ms):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + ".%03dZ" % (ms % 1000)

# As the engine writes a flow: its event log (no snapshot: the engine keeps projections in memory),
# its status and label index entries, its labels hash.
for fid, status, last in flows:
    ev = lambda i, kind, data: json.dumps(
        {"timestamp": ts(last - 5 + i), "sequence": i, "type": kind, "aggregate_id": ["flow", fid],
         "data": dict(data, flow_id=fid)}, separators=(",", ":"))
    started = {"plan": plan, "init": {"order_id": fid}, "labels": {"tenant": "acme"}}
    if ":" in fid:  # a child flow names its parent
        parent, step, token = fid.split(":")
        started["metadata"] = {"parent_flow_id": parent, "parent_step_id": step,
                               "parent_work_item_token": token}
    events = [
        ev(0, "flow_started", started),
        ev(1, "step_started", {"inputs": {"order_id": fid}, "step_id": "ship",
                               "work_items": {"t1": {"order_id": fid}}}),
        ev(2, "work_succeeded", {"step_id": "ship", "token": "t1", "outputs": {"receipt": "r-77"}}),
        ev(3, "attribute_set", {"value": "r-77", "step_id": "ship", "key": "receipt"}),
        ev(4, "step_completed", {"outputs": {"receipt": "r-77"}, "step_id": "ship", "duration": 281}),
    ]
    if status == "completed":
        events += [ev(5, "flow_completed", {"result": {"receipt": "r-77"}}),
                   ev(5, "flow_deactivated", {"status": "completed"})]
    elif status == "failed":
        events += [ev(5, "flow_failed", {"error": "carrier refused"}),
                   ev(5, "flow_deactivated", {"status": "failed"})]
    p = r.pipeline()
    p.rpush(f"argyll:flow:{fid}:events", *events)
    p.hset(f"argyll:flow:{fid}:idx:labels", "tenant", "acme")
    p.hset("argyll:idx:status", f"flow:{fid}", status)
    p.zadd(f"argyll:idx:status:{status}", {f"flow:{fid}": last})
    p.sadd("argyll:idx:label:tenant:acme", f"flow:{fid}")
    p.sadd("argyll:idx:label:tenant", "acme")
    p.execute()
print(f"wrote {len(flows)} sample flows; retention 7d")

def as_dict(reply):
    return reply if isinstance(reply, dict) else dict(zip(reply[::2], reply[1::2]))

dry = as_dict(r.execute_command("FLOWARCHIVE.SWEEP", "DRYRUN"))
print("FLOWARCHIVE.SWEEP DRYRUN would archive:", dry["flows"])
summary = as_dict(r.execute_command("FLOWARCHIVE.SWEEP"))
summary.pop("flows", None)
print("FLOWARCHIVE.SWEEP:", summary)
print("index archived:flows:", r.hgetall("archived:flows"))
print("live flows left:", sorted(k for k in r.keys("argyll:flow:*:events")))
s3 = boto3.client("s3", endpoint_url="http://127.0.0.1:18333", region_name="us-east-1",
                  aws_access_key_id=os.environ.get("FLOWARCHIVE_S3_KEY", "flowarchive-test-key"),
                  aws_secret_access_key=os.environ.get("FLOWARCHIVE_S3_SECRET", "flowarchive-test-secret-9f3b"))
loc = r.hget("archived:flows", "order-1001")
bucket, key = loc[len("s3://"):].split("/", 1)
body = gzip.decompress(s3.get_object(Bucket=bucket, Key=key)["Body"].read()).decode()
print(f"\n{loc}:")
for line in body.splitlines():
    print("  " + (line if len(line) < 160 else line[:157] + "..."))
for fid in ("order-1001", "order-1003", "order-1004", "order-9999"):
    state = r.execute_command("FLOWARCHIVE.GET", fid)
    shown = state if state is None else state[:100] + " ... " + state[-60:]
    print(f"FLOWARCHIVE.GET {fid}: {shown}")
print("\n" + r.info("flowarchive").__repr__())
PY
