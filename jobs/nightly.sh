#!/usr/bin/env bash
# Nightly corpus build: the main job into a dated output prefix.
#   bash jobs/nightly.sh input.uri=s3://corpus/pdfs output.uri=s3://corpus/nightly [overrides]
# writes to <output.uri>/<YYYY-MM-DD>/. With RAY_ADDRESS set it is submitted to that cluster,
# otherwise it runs on embedded local Ray.
set -euo pipefail
cd "$(dirname "$0")/.."
day=${NIGHTLY_DATE:-$(date -u +%F)}
args=(); out=""
for a in "$@"; do
  case "$a" in
    output.uri=*) out="${a#output.uri=}" ;;
    *) args+=("$a") ;;
  esac
done
: "${out:?pass output.uri=<prefix>}"
target="${out%/}/$day"
echo "pagemill nightly: writing to $target" >&2
if [[ -n "${RAY_ADDRESS:-}" ]]; then
  exec bash jobs/submit.sh output.uri="$target" "${args[@]}"
fi
exec python -m pipeline.run output.uri="$target" "${args[@]}"
