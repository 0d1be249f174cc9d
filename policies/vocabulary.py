"""The words a rollout's judgement is made of, each defined once: arms and decisions.

An *arm* is one side of a rollout: the route's incumbent model or the
candidate. An output answered by a route's fallback model belongs to neither
arm: it is recorded beside the failed attempt it stood in for, which the judge
still counts against that attempt's arm. A *decision* is what a check, or a
whole verdict, says.
"""

from __future__ import annotations

from enum import StrEnum


class Arm(StrEnum):
    INCUMBENT = "incumbent"
    CANDIDATE = "candidate"
    FALLBACK = "fallback"  # an output's role only: the answer a fallback model gave

    @property
    def other(self) -> Arm:
        """The other side of a pair (mirroring sends a request there)."""
        return Arm.INCUMBENT if self is Arm.CANDIDATE else Arm.CANDIDATE


ARMS = (Arm.INCUMBENT, Arm.CANDIDATE)  # the two sides the judge compares


class Decision(StrEnum):
    PASS = "PASS"  # evidence that any regression is within tolerance
    FAIL = "FAIL"  # evidence of a regression beyond tolerance
    INCONCLUSIVE = "INCONCLUSIVE"  # neither yet


PASS, FAIL, INCONCLUSIVE = Decision.PASS, Decision.FAIL, Decision.INCONCLUSIVE
