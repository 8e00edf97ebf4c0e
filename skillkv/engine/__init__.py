"""Inference engine: model runners over explicit KV prefixes, sampling and the decode loop."""
