"""What a user runs: the `clusmar` command, the demo, and `clusmar round` / `clusmar status`."""
