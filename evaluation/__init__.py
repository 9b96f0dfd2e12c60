"""Evaluation of DP demonstrations (Tang et al. ICLR 2024 protocol) and a leakage audit.

``dpicl eval`` reproduces the paper's table on our engine; ``dpicl audit`` plants canaries.
This package sits outside the core (``dp_decoding``) and only consumes it: nothing here
changes how demonstrations are generated; DP rows go through
:class:`dp_decoding.generate.DemoGenerator` with a plan from :func:`dp_decoding.plan.make_plan`.
Its plot needs matplotlib (the ``eval`` extra), imported only when a report is written, so
``dpicl serve`` never loads it.
"""
