"""One module per pipeline (generate_pool, score, cluster, select): an options class, `build(pipeline,
options)` that adds the steps, and `run(argv or options)`."""
