#!/usr/bin/env bash
# Launch one round (or one stage) from the Flex Template and return without waiting; follow it with
# `clusmar status --workdir gs://BUCKET/al` or in the Dataflow console.
# Usage: deploy/dataflow/launch_round.sh PROJECT REGION BUCKET CONFIG_GS_PATH [ROUND] [TAG]
set -euo pipefail
PROJECT=${1:?PROJECT}; REGION=${2:?REGION}; BUCKET=${3:?BUCKET}; CONFIG=${4:?gs:// path of round.yaml}
ROUND=${5:-}; TAG=${6:-0.1.0}
REPO="$REGION-docker.pkg.dev/$PROJECT/clusmar"
PARAMS="stage=round,config=$CONFIG,sdk_container_image=$REPO/sdk:$TAG"
if [ -n "$ROUND" ]; then PARAMS="$PARAMS,round=$ROUND"; fi
gcloud dataflow flex-template run "clusmar-round-$(date +%Y%m%d-%H%M%S)" \
  --template-file-gcs-location "gs://$BUCKET/templates/clusmar-$TAG.json" \
  --project "$PROJECT" --region "$REGION" --temp-location "gs://$BUCKET/tmp" \
  --parameters "$PARAMS"
