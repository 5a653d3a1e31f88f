"""`python -m pipelines.generate_pool`: the generate_pool pipeline, clusmar_beam.pipelines.generate_pool (the same as `clusmar generate-pool`)."""
import sys

from clusmar_beam.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate-pool", *sys.argv[1:]]))
