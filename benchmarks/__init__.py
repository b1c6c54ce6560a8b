"""Benchmarks of the engine beside bubblewrap, runc and plain fork+exec.

Run ``sudo .venv/bin/python -m benchmarks``. docs/benchmarks.md describes the
measurements and contains the latest results.
"""
