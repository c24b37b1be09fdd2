#!/bin/sh
# Entry of a chatserver container in docker-compose.yml: join the Ray cluster
# at $RAY_HEAD (host:port) as a node with no CPUs of its own, then run the
# command. `chatserver serve --engine ray --ray-address auto` is then a Ray
# driver on its own node: its actors go to the workers, and it needs no Ray
# Client server (ray[client], grpcio) on the head. An empty RAY_HEAD skips
# the join (an instance with its own engine).
set -eu
if [ -n "${RAY_HEAD:-}" ]; then
  ray start --address="$RAY_HEAD" --num-cpus=0 --object-store-memory=134217728 \
    --disable-usage-stats
fi
exec "$@"
