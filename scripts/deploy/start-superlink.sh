#!/usr/bin/env bash
# Start the SuperLink with TLS and SuperNode authentication; it keeps its state in STATE_DIR.
# Usage: start-superlink.sh CERT_DIR STATE_DIR HOST PORT
set -euo pipefail
if [ "$#" -ne 4 ]; then
    echo "usage: $0 CERT_DIR STATE_DIR HOST PORT" >&2
    exit 2
fi
cert_dir=$1
state_dir=$2
host=$3
port=$4
mkdir -p "$state_dir"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

exec flower-superlink \
    --ssl-ca-certfile "$cert_dir/ca.crt" \
    --ssl-certfile "$cert_dir/server.pem" \
    --ssl-keyfile "$cert_dir/server.key" \
    --enable-supernode-auth \
    --disable-runtime-dependency-installation \
    --database "$state_dir/superlink.db" \
    --host "$host" \
    --port "$port"
