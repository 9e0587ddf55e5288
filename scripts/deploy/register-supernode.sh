#!/usr/bin/env bash
# Register a SuperNode's public key with the SuperLink, so that the SuperNode can connect.
# Usage: register-supernode.sh CONNECTION PUBLIC_KEY SITE_NAME
set -euo pipefail
if [ "$#" -ne 3 ]; then
    echo "usage: $0 CONNECTION PUBLIC_KEY SITE_NAME" >&2
    exit 2
fi
connection=$1
public_key=$2
site_name=$3

flwr supernode register "$public_key" "$connection" --name "$site_name"
