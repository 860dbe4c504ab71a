"""Benchmarks: scripts that reproduce the paper's experiments and measure speed. Run as `python -m benchmarks.NAME`;
each prints its table and writes benchmarks/results/NAME.json and NAME.md with the date, machine and command."""
