"""Compatibility name of :mod:`dp_decoding.generation` (the private generation loop).

``from dp_decoding.generate import DemoGenerator, Demonstration, Progress`` keeps working;
new code imports from :mod:`dp_decoding.generation`.
"""

from dp_decoding.generation import (
    DemoGenerator,
    Demonstration,
    Progress,
    ProgressCallback,
)

__all__ = ["DemoGenerator", "Demonstration", "Progress", "ProgressCallback"]
