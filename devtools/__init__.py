"""Development tooling shared by the tests and the benchmarks (never imported by the core).

- :mod:`devtools.server`: start real ``dpicl serve`` processes on free loopback ports and run
  ``dpicl`` subcommands, for end-to-end tests and the serving benchmarks;
- :mod:`devtools.machine`: what a benchmark reports about the machine it ran on, and how much
  of the CPU other processes used while it measured.

Invariant: nothing under ``dp_decoding``, ``proxy``, ``accountant``, ``prompts`` or
``evaluation`` imports this package; it depends on the core's own dependencies only (httpx,
and torch/transformers lazily, for :func:`devtools.machine.machine_info`).
"""
