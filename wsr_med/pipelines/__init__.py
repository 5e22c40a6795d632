"""Studies and benchmarks that drive wsr_med: ablations and speed/memory measurements."""
