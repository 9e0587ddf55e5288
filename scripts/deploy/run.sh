#!/usr/bin/env bash
# Run the sift-fl app from this repository on the SuperLink connection CONNECTION.
# Usage: run.sh CONNECTION RUN_CONFIG
set -euo pipefail
if [ "$#" -ne 2 ]; then
    echo "usage: $0 CONNECTION RUN_CONFIG" >&2
    exit 2
fi
connection=$1
run_config=$2
cd "$(dirname "$0")/../.."

exec flwr run . "$connection" --stream --run-config "$run_config"
