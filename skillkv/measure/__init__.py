"""What `skillkv bench`, `skillkv eval` and `skillkv loadtest` run, and the GPU benchmarks
(`python -m skillkv.measure.bench_gpu`, `python -m skillkv.measure.bench_compose_gpu`)."""
