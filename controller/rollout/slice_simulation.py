"""Seeded traffic over prompt slices, through the judge's own slice search.

What `docs/policy.md` promises about slices is measured here: over A/A rollouts (both
arms the same model) the share with any slice FAIL, and for a candidate worse on one
slice, how many pairs the judge needs to name it. Units are built as the judge sees
them (`Unit` with tags and probe pairs) and folded into a real `JudgeState`; the
findings are read every `look_every` units, as a loop reading after every tick would.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from policies.judge import JudgeState, Side, Unit, slice_findings
from policies.policy import Policy
from policies.prompt_tags import tags_of
from policies.slices import SliceFinding
from policies.vocabulary import Arm

# Prompts whose tags spread over more than 20 slices: quoted text of each length bucket
# and two scripts, people, colours, three prompt lengths.
PROMPTS = (
    ("a red sign that says {q}", 0.25),
    ("portrait of a woman holding a card that says {q}", 0.10),
    ("a poster with the words {q} on a #ff8800 background in a quiet city street at dusk", 0.05),
    ("a bowl of fruit on a wooden table", 0.25),
    ("portrait of an old fisherman in warm evening light", 0.15),
    (
        "a long and detailed description of a sunny harbour with boats, gulls, people walking "
        "along the pier, children with kites and a lighthouse far away on the hill",
        0.20,
    ),
)
QUOTES = {
    "1-4": ("OPEN", "ХЛЕБ"),
    "5-12": ("Fresh Bread", "Welcome"),
    "13+": ("Every Journey Starts",),
}


@dataclass(frozen=True)
class SliceTraffic:
    """A stream of pairs. `worse_on` names a tag where the candidate's CER is `shift` higher."""

    pairs: int = 1500
    look_every: int = 25
    text_shares: dict[str, float] = field(
        default_factory=lambda: {"1-4": 0.15, "5-12": 0.15, "13+": 0.10}
    )
    cer_mean: float = 0.3
    cer_sd: float = 0.15
    failure: float = 0.03  # both arms' per-request failure rate
    worse_on: str | None = None
    shift: float = 0.0


@dataclass
class SliceOutcome:
    findings: list[SliceFinding]  # the first look's findings that had any
    found_at: int | None  # pairs when a finding first named `worse_on` (None: never)
    slices_judged: int  # admitted slices with at least min_samples units at the end
    state: JudgeState  # as it stood at the end (or when the slice was found)


def _prompt(traffic: SliceTraffic, rng: random.Random) -> str:
    draw = rng.random()
    for bucket, share in traffic.text_shares.items():
        if draw < share:
            quote = rng.choice(QUOTES[bucket])
            template = rng.choice([p for p, _ in PROMPTS if "{q}" in p])
            return template.format(q=f'"{quote}"')
        draw -= share
    plain = [(p, w) for p, w in PROMPTS if "{q}" not in p]
    return rng.choices([p for p, _ in plain], weights=[w for _, w in plain])[0]


def _side(rng: random.Random, failure: float) -> Side:
    ok = rng.random() >= failure
    return Side(["ok" if ok else "error"], 1000.0 if ok else None, 0.0 if ok else None, 0.1)


def simulate_slices(
    policy: Policy, traffic: SliceTraffic, seed: int, stop_when_found: bool = True
) -> SliceOutcome:
    """One rollout's pairs through a fresh judge state (all of them, unless the slice
    `worse_on` is found first and `stop_when_found`)."""
    rng = random.Random(seed)
    state = JudgeState(policy)
    first: list[SliceFinding] = []
    found_at = None
    for n in range(1, traffic.pairs + 1):
        prompt = _prompt(traffic, rng)
        tags = tuple(tags_of(prompt, "generate", {"size": "512x512"}))
        arms = {
            Arm.CANDIDATE: _side(rng, traffic.failure),
            Arm.INCUMBENT: _side(rng, traffic.failure),
        }
        scores = {}
        if '"' in prompt and all(a.statuses == ["ok"] for a in arms.values()):
            incumbent = min(max(rng.gauss(traffic.cer_mean, traffic.cer_sd), 0.0), 1.0)
            candidate = min(max(rng.gauss(traffic.cer_mean, traffic.cer_sd), 0.0), 1.0)
            if traffic.worse_on in tags:
                candidate = min(candidate + traffic.shift, 1.0)
            scores["typography_cer"] = [(candidate, incumbent)]
        unit = Unit(f"r{n}", arms, scores, tags)
        state.fold_arms(unit)
        state.fold_scores(unit, [])
        if n % traffic.look_every:
            continue
        findings = slice_findings(state)
        if findings and not first:
            first = findings
        if (
            found_at is None
            and traffic.worse_on
            and any(traffic.worse_on in f.slice.split(" & ") for f in findings)
        ):
            found_at = n
            if stop_when_found:
                break
    judged = {
        name
        for counts in state.slices.counts.values()
        for name, c in counts.items()
        if name != "*" and c.n >= policy.slices.min_samples
    }
    return SliceOutcome(first, found_at, len(judged), state)
