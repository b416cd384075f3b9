#!/usr/bin/env bash
# Scheduled dataset refresh. Exit codes (pipeline/refresh.py): 0 updated or nothing new,
# 2 bad input / unreachable catalog / incompatible dataset, 3 no scenes, 4 another run holds
# the lock, 5 some scenes unreadable (skipped; retried next time), 6 disk full, 1 bug. Anything non-zero should alert: cron mails stderr, Kubernetes marks the Job failed.
set -uo pipefail
OUTPUT="${REFRESH_OUTPUT:-/data/europe}"
AOI="${REFRESH_AOI:-europe}"
CATALOG="${REFRESH_CATALOG:-earth-search}"
spectralgpt refresh --aoi "$AOI" --catalog "$CATALOG" --output "$OUTPUT" ${REFRESH_ARGS:-}
rc=$?
if [ "$rc" -ne 0 ]; then
    echo "refresh of $OUTPUT failed with exit code $rc" >&2
fi
exit "$rc"
