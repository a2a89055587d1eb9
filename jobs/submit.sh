#!/usr/bin/env bash
# Submit the main job to a running Ray cluster from the repo root.
#   RAY_ADDRESS=http://HEAD:8265 bash jobs/submit.sh input.uri=s3://… output.uri=s3://… [overrides]
# Extra `ray job submit` flags go in SUBMIT_FLAGS (e.g. "--no-wait --submission-id nightly-01").
# The driver joins the cluster through the RAY_ADDRESS Ray sets for it (a bare ray.init()); the
# cluster preset (conf/cluster/ray.yaml) makes input.uri and output.uri mandatory.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${RAY_ADDRESS:?set RAY_ADDRESS to the dashboard address of the cluster, e.g. http://127.0.0.1:8265}"
exec ray job submit --address "$RAY_ADDRESS" --working-dir . --runtime-env jobs/runtime_env.yaml \
  ${SUBMIT_FLAGS:-} -- python -m pipeline.run +cluster=ray "$@"
