#!/usr/bin/env bash
# Start a SuperNode that verifies the SuperLink with CA_CERT and signs its requests with PRIVATE_KEY.
# NODE_CONFIG carries the client id, the data partition and the state directory, e.g.
#   'client-id="0" partition-id=0 num-partitions=4 state-dir="/srv/sift-fl/site-0/state"'
# Usage: start-supernode.sh CA_CERT SUPERLINK_ADDRESS PRIVATE_KEY PORT NODE_CONFIG
set -euo pipefail
if [ "$#" -ne 5 ]; then
    echo "usage: $0 CA_CERT SUPERLINK_ADDRESS PRIVATE_KEY PORT NODE_CONFIG" >&2
    exit 2
fi
ca_cert=$1
superlink=$2
private_key=$3
port=$4
node_config=$5
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

exec flower-supernode \
    --root-certificates "$ca_cert" \
    --superlink "$superlink" \
    --auth-supernode-private-key "$private_key" \
    --host 127.0.0.1 \
    --port "$port" \
    --node-config "$node_config"
