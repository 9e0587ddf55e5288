#!/usr/bin/env bash
# Add a SuperLink connection named NAME to $FLWR_HOME/config.toml, for `flwr run` and `flwr supernode`.
# Usage: add-connection.sh NAME ADDRESS CA_CERT
set -euo pipefail
if [ "$#" -ne 3 ]; then
    echo "usage: $0 NAME ADDRESS CA_CERT" >&2
    exit 2
fi
name=$1
address=$2
ca_cert=$3
flwr_home=${FLWR_HOME:-$HOME/.flwr}
config="$flwr_home/config.toml"
if [ -f "$config" ] && grep -q "^\[superlink\.$name\]" "$config"; then
    echo "error: $config already has a connection named $name; remove it or choose another name" >&2
    exit 1
fi
mkdir -p "$flwr_home"

cat >>"$config" <<TOML

[superlink.$name]
address = "$address"
root-certificates = "$ca_cert"
TOML
