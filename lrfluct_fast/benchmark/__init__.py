"""End-to-end overhead benchmarks: models, the interleaved runner, the `lrfluct bench` command."""
