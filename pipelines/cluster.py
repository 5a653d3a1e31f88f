"""`python -m pipelines.cluster`: the cluster pipeline, clusmar_beam.pipelines.cluster (the same as `clusmar cluster`)."""
import sys

from clusmar_beam.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["cluster", *sys.argv[1:]]))
