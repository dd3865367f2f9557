"""Studies over many responses. ``rhythm``: does [PA]'s preplan-and-anchor rhythm show in the served
model (spec §11)?"""

from faithlens.study.rhythm import (
    PA_FIGURES,
    ResponseRhythm,
    RhythmConfig,
    RhythmReport,
    pool_rhythm,
    study_problems,
    study_response,
)

__all__ = [
    "PA_FIGURES",
    "ResponseRhythm",
    "RhythmConfig",
    "RhythmReport",
    "pool_rhythm",
    "study_problems",
    "study_response",
]
