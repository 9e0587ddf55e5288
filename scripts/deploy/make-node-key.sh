#!/usr/bin/env bash
# Write a SuperNode key pair: the private key at KEY_PATH, the public key at KEY_PATH.pub.
# Usage: make-node-key.sh KEY_PATH SITE_NAME
set -euo pipefail
if [ "$#" -ne 2 ]; then
    echo "usage: $0 KEY_PATH SITE_NAME" >&2
    exit 2
fi
key_path=$1
site_name=$2

python -m sift_fl.deployment.credentials node-key --out "$key_path" --comment "$site_name"
