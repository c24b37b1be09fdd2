#!/usr/bin/env bash
# Make sure a Redis server answers; print `export CHATSERVER_TEST_REDIS_URL=...`.
# Installs redis-server from Debian's packages when absent; uses the server on
# the given port if it answers, else starts a private one on a free port.
set -euo pipefail
port="${1:-6379}"

answers() {
  python3 - "$1" <<'PY'
import socket, sys
try:
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1)
    s.sendall(b"PING\r\n")
    ok = s.recv(16).startswith(b"+PONG")
except OSError:
    ok = False
sys.exit(0 if ok else 1)
PY
}

# The binary is needed even when a server answers: a test stalls a private one.
if ! command -v redis-server >/dev/null; then
  echo "installing redis-server" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) >&2
fi
if answers "$port"; then
  echo "export CHATSERVER_TEST_REDIS_URL=redis://127.0.0.1:$port/15"
  exit 0
fi
free_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
dir="$(pwd)/.redis-test"
mkdir -p "$dir"
redis-server --daemonize yes --bind 127.0.0.1 --port "$free_port" --save "" --appendonly no \
  --dir "$dir" --logfile "$dir/redis.log" --pidfile "$dir/redis.pid" >&2
for _ in $(seq 50); do answers "$free_port" && break; sleep 0.1; done
answers "$free_port" || { echo "redis-server did not start" >&2; exit 1; }
echo "started redis-server on 127.0.0.1:$free_port" >&2
echo "export CHATSERVER_TEST_REDIS_URL=redis://127.0.0.1:$free_port/15"
