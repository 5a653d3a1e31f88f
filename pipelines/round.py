"""`python -m pipelines.round`: the same as `clusmar round` (clusmar_beam.app.round)."""
import sys

from clusmar_beam.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["round", *sys.argv[1:]]))
