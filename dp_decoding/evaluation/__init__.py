"""Evaluation of DP demonstrations (Tang et al. ICLR 2024 protocol) and a leakage audit.

``dpicl eval`` reproduces the paper's table on our engine; ``dpicl audit`` plants canaries.
Nothing here changes how demonstrations are generated: DP rows go through
:class:`dp_decoding.generate.DemoGenerator` with a plan from :func:`dp_decoding.plan.make_plan`.
"""
