#!/bin/bash
# The README's main-job line in a fresh clone of this repository's committed HEAD, each `&&` stage timed.
#   bash bench/main_job.sh [CLONE_DIR]        (default /tmp/twn-main-job; it is deleted first)
# Prints one line per stage and the total; the job's own output goes to CLONE_DIR.log.
set -u
repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
dir=${1:-/tmp/twn-main-job}
rm -rf "$dir" "$dir.log" && git clone -q "$repo" "$dir" && cd "$dir" || exit 1
line=$(grep -m1 '^python3 -m venv .venv && .* python train_sft.py' README.md)
echo "main job at $(git log -1 --format=%h), $(nproc) cores: $line"
ms() { echo $(( $(date +%s%N) / 1000000 )); }
since() { local d=$(( $(ms) - $1 )); printf "%6d.%d s  %s\n" $((d / 1000)) $((d % 1000 / 100)) "$2"; }
start=$(ms)
while IFS= read -r stage; do
  t=$(ms)
  eval "$stage" < /dev/null >> "$dir.log" 2>&1 || { echo "failed: $stage (see $dir.log)"; exit 1; }
  since "$t" "$stage"
done < <(echo "$line" | sed 's/ && /\n/g')
since "$start" total
