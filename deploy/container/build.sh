#!/usr/bin/env bash
# Build and push the SDK worker image. Usage: deploy/container/build.sh IMAGE
# e.g. deploy/container/build.sh us-central1-docker.pkg.dev/my-project/clusmar/sdk:0.1.0
set -euo pipefail
IMAGE=${1:?usage: build.sh IMAGE}
cd "$(dirname "$0")/../.."
docker build -f deploy/container/Dockerfile -t "$IMAGE" .
docker push "$IMAGE"
