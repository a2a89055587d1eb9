#!/usr/bin/env bash
# Nightly corpus build.
#   bash jobs/nightly.sh input.uri=s3://corpus/pdfs output.uri=s3://corpus/nightly [overrides]
# NIGHTLY_LAYOUT=dated (default): builds incrementally into <output.uri>/_store/ (ledger, lease,
#   stat cache: only new or changed documents are OCRed) and then writes the night's dated snapshot
#   <output.uri>/<YYYY-MM-DD>/ (NIGHTLY_DATE overrides the day): that night's input rows, hard-linked
#   (POSIX) or server-side copied (object stores) from the store (pipeline/dated.py); re-running the
#   same night resumes it and rewrites the snapshot.
# NIGHTLY_LAYOUT=incremental: writes to <output.uri> itself, one growing corpus; each night only
#   new or changed documents are processed (the ledger), and the night's record lands in _runs/.
# With RAY_ADDRESS set it is submitted to that cluster with --submission-id
#   pagemill-nightly-<output root>-<hash of the root>-<YYYY-MM-DD>, otherwise it runs on embedded local Ray.
set -euo pipefail
cd "$(dirname "$0")/.."
day=${NIGHTLY_DATE:-$(date -u +%F)}
layout=${NIGHTLY_LAYOUT:-dated}
args=(); out=""
for a in "$@"; do
  case "$a" in
    output.uri=*) out="${a#output.uri=}" ;;
    NIGHTLY_LAYOUT=*) layout="${a#NIGHTLY_LAYOUT=}" ;;
    *) args+=("$a") ;;
  esac
done
: "${out:?pass output.uri=<prefix>}"
snap=()
case "$layout" in
  dated) target="${out%/}/_store"; snap=("output.snapshot_uri=${out%/}/$day") ;;
  incremental) target="${out%/}" ;;
  *) echo "NIGHTLY_LAYOUT must be dated or incremental, not '$layout'" >&2; exit 2 ;;
esac
echo "pagemill nightly ($layout): writing to $target${snap:+ (snapshot ${snap[0]#output.snapshot_uri=})}" >&2
if [[ -n "${RAY_ADDRESS:-}" ]]; then
  # One submission per output root and night: a second submission of the same night is refused by
  # Ray (submission ids are unique), so a cron double-fire cannot run two writers on one output.
  slug=$(printf '%s' "${out%/}" | tr -c 'A-Za-z0-9' '-' | tr -s '-' | sed 's/^-//; s/-$//' | tail -c 40)
  root_hash=$(printf '%s' "${out%/}" | sha256sum | cut -c1-8)
  submission_id="pagemill-nightly-${slug}-${root_hash}-${day}"
  echo "pagemill nightly: submission id $submission_id" >&2
  SUBMIT_FLAGS="${SUBMIT_FLAGS:-} --submission-id $submission_id" \
    exec bash jobs/submit.sh output.uri="$target" "${snap[@]}" "${args[@]}"
fi
exec python -m pipeline.run output.uri="$target" "${snap[@]}" "${args[@]}"
