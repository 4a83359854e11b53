#!/usr/bin/env bash
# Runs the first bash block of README.md exactly as written and checks that it ends with an AP line.
set -euo pipefail
cd "$(dirname "$0")/.."
block=$(awk '/^```bash$/ {inside=1; next} /^```$/ && inside {exit} inside {print}' README.md)
log=$(mktemp)
start=$(date +%s)
bash -euo pipefail -c "$block" 2>&1 | tee "$log" | grep -E "^Epoch: \[[0-9]+\] Total|^bbox AP|^Training completed" || true
last=$(tail -n 1 "$log")
echo "quick start: $(( $(date +%s) - start )) s; last line: $last"
case "$last" in
    "bbox AP: "*) ;;
    *) echo "the quick start did not end with an AP line"; tail -30 "$log"; exit 1 ;;
esac
