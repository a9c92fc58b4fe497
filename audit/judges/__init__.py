"""Judges: decide whether a completion is a refusal / a jailbreak. One interface, several judges.

The audit code reaches judges only through `Judge`. In-process: `SubstringJudge` (the
JailbreakBench refusal-prefix list). Remote: the HarmBench classifier sidecar (JudgeService).
"""

from .base import Judge, JudgeError, JudgeItem, Verdict
from .gate import CoherenceGate, GateCalibration, calibrate, gate_summary, repetition_rate
from .substring import REFUSAL_SUBSTRINGS, SubstringJudge

__all__ = ["CoherenceGate", "GateCalibration", "calibrate", "gate_summary", "repetition_rate", "Judge", "JudgeError", "JudgeItem", "Verdict", "SubstringJudge", "REFUSAL_SUBSTRINGS"]
