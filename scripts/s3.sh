#!/usr/bin/env bash
# Starts or stops the local SeaweedFS S3 server used by the demo and the tests (one per machine: it
# uses fixed internal ports). It verifies SigV4 signatures, Content-MD5 and x-amz-checksum-sha256.
#   scripts/s3.sh start|stop|status
set -euo pipefail
cd "$(dirname "$0")/.."
: "${FLOWARCHIVE_S3_PORT:=18333}"
: "${FLOWARCHIVE_S3_KEY:=flowarchive-test-key}"
: "${FLOWARCHIVE_S3_SECRET:=flowarchive-test-secret-9f3b}"
dir=target/seaweedfs
pidfile=$dir/weed.pid

up() { (exec 3<>/dev/tcp/127.0.0.1/"$FLOWARCHIVE_S3_PORT") 2>/dev/null; }

case "${1:-start}" in
  start)
    if up; then echo "S3 already up on 127.0.0.1:$FLOWARCHIVE_S3_PORT"; exit 0; fi
    weed=$(grep '^FLOWARCHIVE_WEED=' target/testbed.env 2>/dev/null | cut -d= -f2- || true)
    [ -n "$weed" ] || weed=$(command -v weed)
    mkdir -p "$dir/data"
    AWS_ACCESS_KEY_ID=$FLOWARCHIVE_S3_KEY AWS_SECRET_ACCESS_KEY=$FLOWARCHIVE_S3_SECRET \
      nohup "$weed" mini -dir="$dir/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3.port="$FLOWARCHIVE_S3_PORT" \
      -admin.ui=false -webdav=false -s3.port.iceberg=0 -s3.port.lance=0 >"$dir/weed.log" 2>&1 &
    echo $! >"$pidfile"
    for _ in $(seq 1 120); do
      if up; then echo "S3 up on 127.0.0.1:$FLOWARCHIVE_S3_PORT"; exit 0; fi
      sleep 0.5
    done
    echo "SeaweedFS did not start; see $dir/weed.log" >&2
    tail -20 "$dir/weed.log" >&2 || true
    exit 1
    ;;
  stop)
    # Waits for the exit: a SeaweedFS still shutting down removes the unix sockets of one started
    # after it (its S3 port then answers every request with an error).
    if [ -f "$pidfile" ]; then
      pid=$(cat "$pidfile")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$pidfile"
    fi
    ;;
  status)
    up && echo up || { echo down; exit 1; }
    ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
