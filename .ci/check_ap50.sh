#!/usr/bin/env bash
# usage: check_ap50.sh LOG FLOOR
# Passes when the last line of LOG is main.py's AP line ("bbox AP: ...  AP50: ...  AP75: ...")
# and its AP50 is at least FLOOR; otherwise says why and exits 1.
set -euo pipefail
if [ $# -ne 2 ]; then
    echo "usage: $0 LOG FLOOR" >&2
    exit 2
fi
log=$1 floor=$2
last=$(tail -n 1 "$log")
ap50=$(sed -n 's/^bbox AP: [0-9.]*  AP50: \([0-9.]*\)  AP75: [0-9.]*$/\1/p' <<< "$last")
if [ -z "$ap50" ]; then
    echo "$log does not end with an AP line; last line: $last"
    exit 1
fi
if awk -v got="$ap50" -v floor="$floor" 'BEGIN { exit !(got >= floor) }'; then
    echo "AP50 $ap50 >= floor $floor"
else
    echo "AP50 $ap50 is below the floor $floor: the quick start no longer learns as it did"
    exit 1
fi
