"""`python -m pipelines.select`: the select pipeline, clusmar_beam.pipelines.select (the same as `clusmar select`)."""
import sys

from clusmar_beam.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["select", *sys.argv[1:]]))
