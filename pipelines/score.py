"""`python -m pipelines.score`: the score pipeline, clusmar_beam.pipelines.score (the same as `clusmar score`)."""
import sys

from clusmar_beam.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
