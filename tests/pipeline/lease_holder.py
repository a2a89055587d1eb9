"""A second, real process for the lease tests: takes the lease of an output root and holds it
(heartbeat thread running) until killed, or until it notices it was taken over.

    python -m tests.pipeline.lease_holder OUTPUT_URI TIMEOUT_S RUN_ID [STORAGE_OPTIONS_JSON]

Prints `held <generation>` once it holds the lease, `refused <message>` if another run holds it
(exit 6, as the job), `lost` (exit 7) when another run has taken it over."""

from __future__ import annotations

import json
import sys
import time

from pipeline.lease import Lease, LeaseHeld
from pipeline.outputs import OutputStore


def main() -> None:
    uri, timeout_s, run_id = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    opts = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    try:
        lease = Lease(OutputStore(uri, opts), run_id, timeout_s).acquire()
    except LeaseHeld as e:
        print(f"refused {e}", flush=True)
        sys.exit(6)
    print(f"held {lease.generation}", flush=True)
    while not lease.lost:
        time.sleep(0.05)
    print("lost", flush=True)
    sys.exit(7)


if __name__ == "__main__":
    main()
