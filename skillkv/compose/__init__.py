"""Compose mode: skills placed in any order from their own snapshots, boundary repair, and the measured fidelity
that lets `auto` use it."""
