"""Residency tiers: L2 (the store on disk) -> host memory -> L1 (the runner's pool), with reader threads and a
load-or-recompute policy measured per model."""
