"""`python -m pipelines.status`: the same as `clusmar status` (clusmar_beam.app.status)."""
import sys

from clusmar_beam.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["status", *sys.argv[1:]]))
