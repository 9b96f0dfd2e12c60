"""Private generation of demonstrations: one entry point, separate strategies.

:meth:`DemoGenerator.run` (``DemoGenerator(engine, plan, task, ...).run(records)``) is the
one entry point; it picks one strategy from the plan and the engine's
declared abilities: :class:`FixedStrategy` (step loop; the public-token gate is its
:class:`GateDecision` policy), :class:`ResampledStrategy`, :class:`InEngineStrategy` (design 2,
falling back to the step loop). Module layout: :mod:`.groups` (demonstrations, groups,
progress), :mod:`.decisions`, :mod:`.fixed`, :mod:`.resampled`, :mod:`.in_engine`,
:mod:`.generator`.
"""

from __future__ import annotations

from dp_decoding.generation.decisions import Decision, GateDecision, Selection
from dp_decoding.generation.fixed import FixedStrategy
from dp_decoding.generation.generator import DemoGenerator, Strategy
from dp_decoding.generation.groups import Demonstration, Group, Progress, ProgressCallback
from dp_decoding.generation.in_engine import InEngineStrategy
from dp_decoding.generation.resampled import ResampledStrategy

__all__ = [
    "Decision",
    "DemoGenerator",
    "Demonstration",
    "FixedStrategy",
    "GateDecision",
    "Group",
    "InEngineStrategy",
    "Progress",
    "ProgressCallback",
    "ResampledStrategy",
    "Selection",
    "Strategy",
]
