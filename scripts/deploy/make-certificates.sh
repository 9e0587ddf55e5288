#!/usr/bin/env bash
# Write a throwaway CA and a SuperLink server certificate valid for each HOST.
# Usage: make-certificates.sh CERT_DIR HOST...
set -euo pipefail
if [ "$#" -lt 2 ]; then
    echo "usage: $0 CERT_DIR HOST..." >&2
    exit 2
fi
cert_dir=$1
shift
host_flags=()
for host in "$@"; do
    host_flags+=(--host "$host")
done

python -m sift_fl.deployment.credentials certificates --out "$cert_dir" "${host_flags[@]}"
