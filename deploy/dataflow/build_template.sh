#!/usr/bin/env bash
# Build the SDK image, the launcher image and the Flex Template spec.
# Usage: deploy/dataflow/build_template.sh PROJECT REGION BUCKET [TAG]
set -euo pipefail
PROJECT=${1:?PROJECT}; REGION=${2:?REGION}; BUCKET=${3:?BUCKET}; TAG=${4:-0.1.0}
REPO="$REGION-docker.pkg.dev/$PROJECT/clusmar"
cd "$(dirname "$0")/../.."
deploy/container/build.sh "$REPO/sdk:$TAG"
docker build -f deploy/dataflow/Dockerfile --build-arg SDK_IMAGE="$REPO/sdk:$TAG" -t "$REPO/launcher:$TAG" .
docker push "$REPO/launcher:$TAG"
gcloud dataflow flex-template build "gs://$BUCKET/templates/clusmar-$TAG.json" \
  --image "$REPO/launcher:$TAG" --sdk-language PYTHON --metadata-file deploy/dataflow/metadata.json \
  --project "$PROJECT"
