"""Seeded traffic through the judge: the scenarios its promise has to survive.

The judge is only as honest as its assumptions, and production traffic breaks the
easy ones: users are routed stickily and send wildly different volumes, mirrors
are skipped under load, one request asks for several images, and the mirror has a
shorter timeout than the primary. This module generates that traffic as the
router would record it (`OutputFacts`, the mirrored set, score rows), routes
users with the router's own hash (`controller.serving.routing`), and feeds it to the
judge's own `build_window` and `evaluate`, so tests and `bench/judge_sim.py`
exercise the code that runs in production, not a copy of its maths.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from controller.serving.routing import is_mirrored, primary_role
from controller.serving.traffic import RoutingTable
from policies.checks import FAIL, PASS, CheckResult, overall
from policies.judge import OutputFacts, Window, build_window, evaluate, state_of
from policies.policy import Policy
from policies.vocabulary import Arm
from workers.jobs import OutputStatus

CANDIDATE, INCUMBENT = Arm.CANDIDATE, Arm.INCUMBENT

ROLES = (CANDIDATE, INCUMBENT)


@dataclass(frozen=True)
class Traffic:
    """A traffic model. Rates are per image unless `whole_request_failures`."""

    requests: int = 3000
    stages: tuple[int, ...] = (0, 10, 30, 60, 100)  # the candidate's share of users (0: shadow)
    users: int = 0  # 0: every request comes from a new user
    pareto_shape: float = 1.16  # users' volumes (heavy-tailed) when `users` > 0
    user_spread: float = 0.0  # sd of a user's log failure propensity (0: all users alike)
    images: int = 1
    whole_request_failures: bool = False  # a failure takes out every image of its request
    failure: dict[str, float] = field(default_factory=lambda: {CANDIDATE: 0.03, INCUMBENT: 0.03})
    oom: float = 0.005
    blank: float = 0.002
    mirror_percent: float = 100.0
    mirror_max_in_flight: int = 0  # > 0: mirrors past this many in flight are skipped (load)
    arrivals_per_s: float = 8.0
    latency_median_s: dict[str, float] = field(
        default_factory=lambda: {CANDIDATE: 1.0, INCUMBENT: 1.0}
    )
    latency_sigma: float = 0.4
    request_timeout_s: float = 120.0
    mirror_timeout_s: float = 60.0
    scores: bool = False  # render probe scores (colour ΔE, typography CER) for each ok pair
    colour: tuple[float, float] = (2.0, 1.0)  # ΔE ~ gamma(shape, scale)
    cer_shift: float = 0.0  # candidate CER minus incumbent CER, mean
    cer_sd: float = 0.15
    cer_tail: float = 0.0  # share of pairs whose candidate is worse by 0.3 to 0.6
    typography_share: float = 0.4  # share of prompts that quote text
    probe_error_share: dict[str, float] = field(default_factory=dict)
    nan_every: int = 0  # > 0: every nth colour score is NaN


# The traffic each A/A scenario of issue 11 describes (identical models on both arms).
SCENARIOS: dict[str, Traffic] = {
    "independent": Traffic(),
    # 200 users of Pareto(1.16) volume whose prompts fail at very different rates, routed
    # stickily at a 10% split; 10% of requests are sampled for mirroring and mirrors past 8
    # in flight are skipped, so which requests pair depends on load.
    "sticky_heavy_users": Traffic(
        requests=6_000,
        stages=(10,),
        users=200,
        user_spread=1.5,
        failure={CANDIDATE: 0.05, INCUMBENT: 0.05},
        mirror_percent=10.0,
        mirror_max_in_flight=8,
        arrivals_per_s=10.0,
    ),
    # Four images per request; a failure takes out the whole request.
    "four_images": Traffic(images=4, whole_request_failures=True),
    # Median 25 s, 4% of calls over the mirror's 60 s timeout (the primary's is 120 s).
    "slow_mirror_timeouts": Traffic(
        latency_median_s={CANDIDATE: 25.0, INCUMBENT: 25.0},
        latency_sigma=0.5,
        failure={CANDIDATE: 0.01, INCUMBENT: 0.01},
        arrivals_per_s=0.5,
    ),
    # Probe scores on every pair (a healthy candidate: mean ΔE 2), one colour score in a
    # hundred NaN.
    "nan_scores": Traffic(scores=True, nan_every=100),
    # Probe scores on every pair, the OCR erroring on every image.
    "ocr_always_errors": Traffic(scores=True, probe_error_share={"typography_cer": 1.0}),
}


ScoreRow = tuple[str, str, float | None, str | None]


@dataclass
class Records:
    """One simulated attempt as the router and the scorer would have recorded it."""

    outputs: list[OutputFacts]  # in arrival order
    mirrored: set[str]
    scores: list[ScoreRow]
    shares: dict[str, float]  # request id -> the candidate's share of users in its stage


def generate(traffic: Traffic, rng: random.Random) -> Records:
    """One attempt's records, seeded by `rng`."""
    volumes = (
        [rng.paretovariate(traffic.pareto_shape) for _ in range(traffic.users)]
        if traffic.users
        else []
    )
    propensity = [math.exp(rng.gauss(0.0, traffic.user_spread)) for _ in volumes]
    norm = sum(v * p for v, p in zip(volumes, propensity, strict=True)) / sum(volumes or [1])
    outputs: list[OutputFacts] = []
    mirrored: set[str] = set()
    scores: list[ScoreRow] = []
    shares: dict[str, float] = {}
    in_flight: list[float] = []  # when each mirror in flight ends
    now = 0.0
    per_stage = traffic.requests / len(traffic.stages)
    for k in range(traffic.requests):
        weight = traffic.stages[min(int(k / per_stage), len(traffic.stages) - 1)]
        table = RoutingTable(
            rollout="sim",
            route="generate",
            state="experimenting",
            stage=str(weight),
            version=1,
            candidate_weight=weight,
            mirror_percent=traffic.mirror_percent,
            incumbent=INCUMBENT,
            candidate=CANDIDATE,
        )
        request_id = f"r{k}"
        if volumes:
            user = rng.choices(range(len(volumes)), weights=volumes)[0]
            key, lift = f"u{user}", propensity[user] / norm
        else:
            key, lift = request_id, 1.0
        primary = primary_role(table, key)
        shares[request_id] = weight / 100
        now += rng.expovariate(traffic.arrivals_per_s)
        in_flight = [end for end in in_flight if end > now]
        mirror = is_mirrored(table, request_id) and (
            not traffic.mirror_max_in_flight or len(in_flight) < traffic.mirror_max_in_flight
        )
        roles = ROLES if mirror else (primary,)
        for role in roles:
            timeout = traffic.request_timeout_s if role == primary else traffic.mirror_timeout_s
            statuses, latencies = _arm(traffic, rng, role, lift, timeout)
            if role != primary:
                in_flight.append(now + max(latencies) / 1000)
            for index, (status, latency) in enumerate(zip(statuses, latencies, strict=True)):
                outputs.append(
                    OutputFacts(
                        f"{request_id}-{role}-{index}",
                        request_id,
                        role,
                        index,
                        status,
                        latency,
                        0.0,
                        1,
                        timeout,
                    )
                )
        if mirror:
            mirrored.add(request_id)
            if traffic.scores:
                scores.extend(_scores(traffic, rng, outputs, request_id, k))
    return Records(outputs, mirrored, scores, shares)


def _arm(
    traffic: Traffic, rng: random.Random, role: str, lift: float, timeout: float
) -> tuple[list[str], list[float]]:
    """One arm's statuses and latencies (ms) for a request."""
    p_fail = min(traffic.failure[role] * lift, 1.0)
    whole = traffic.whole_request_failures and rng.random() < p_fail
    statuses, latencies = [], []
    for _ in range(traffic.images):
        latency = traffic.latency_median_s[role] * math.exp(rng.gauss(0.0, traffic.latency_sigma))
        draw = rng.random()
        if whole or (not traffic.whole_request_failures and draw < p_fail):
            status = OutputStatus.ERROR
        elif draw < p_fail + traffic.oom and not traffic.whole_request_failures:
            status = OutputStatus.OOM
        elif rng.random() < traffic.blank:
            status = OutputStatus.BLANK
        elif latency > timeout:
            status, latency = OutputStatus.TIMEOUT, timeout
        else:
            status = OutputStatus.OK
        statuses.append(status)
        latencies.append(latency * 1000)
    return statuses, latencies


def _scores(
    traffic: Traffic, rng: random.Random, outputs: list[OutputFacts], request_id: str, k: int
) -> list[ScoreRow]:
    """Score rows for the request's ok pairs, as the scorer would store them."""
    mine = [o for o in outputs[-2 * traffic.images :] if o.request_id == request_id]
    by_index: dict[int, dict[str, OutputFacts]] = {}
    for o in mine:
        by_index.setdefault(o.image_index, {})[o.role] = o
    rows: list[ScoreRow] = []
    quoted = rng.random() < traffic.typography_share
    for pair in by_index.values():
        if any(pair[role].status != OutputStatus.OK for role in ROLES):
            continue
        cand, inc = pair[CANDIDATE].id, pair[INCUMBENT].id
        if _errored(traffic, rng, "colour_shift_de"):
            rows.append((cand, "colour_shift_de", None, "ValueError: simulated probe error"))
        elif traffic.nan_every and k % traffic.nan_every == 0:
            rows.append((cand, "colour_shift_de", math.nan, None))
        else:
            rows.append((cand, "colour_shift_de", rng.gammavariate(*traffic.colour), None))
        if not quoted:
            continue
        base = min(max(rng.gauss(0.2, 0.1), 0.0), 1.0)
        shift = (
            rng.uniform(0.3, 0.6)
            if rng.random() < traffic.cer_tail
            else rng.gauss(traffic.cer_shift, traffic.cer_sd)
        )
        for output_id, value in ((inc, base), (cand, min(max(base + shift, -1.0), 2.0))):
            if _errored(traffic, rng, "typography_cer"):
                rows.append((output_id, "typography_cer", None, "RuntimeError: OCR failed"))
            else:
                rows.append((output_id, "typography_cer", value, None))
    return rows


def _errored(traffic: Traffic, rng: random.Random, probe: str) -> bool:
    return rng.random() < traffic.probe_error_share.get(probe, 0.0)


@dataclass
class Outcome:
    """What the judge said over one simulated attempt, looking every `look_every` units."""

    first_fail: dict[str, int]  # check name -> units when it first FAILed
    first_pass: dict[str, int]  # check name -> units when it first PASSed
    rollback_at: int | None  # units when a critical check first FAILed
    last: list[CheckResult]


def judge_traffic(
    policy: Policy,
    traffic: Traffic,
    rng: random.Random,
    look_every: int = 100,
    stop_on: str | None = None,
    records: Records | None = None,
) -> Outcome:
    """Judge one attempt as the controller loop would, every `look_every` units.

    `stop_on`: a check's name; the run ends once that check has FAILed or PASSed.
    """
    records = records or generate(traffic, rng)
    window = build_window(records.outputs, records.mirrored, records.scores, {})
    first_fail: dict[str, int] = {}
    first_pass: dict[str, int] = {}
    rollback_at = None
    results: list[CheckResult] = []
    looks = list(range(look_every, len(window.units) + 1, look_every)) or [len(window.units)]
    state, folded = state_of(policy, Window([], window.probe_health)), 0
    for n in looks:
        for unit in window.units[folded:n]:  # as the loop does: each unit folded once
            state.fold_arms(unit)
            state.fold_scores(unit, [])
        folded = n
        results = evaluate(state)
        for r in results:
            if r.decision == FAIL:
                first_fail.setdefault(r.name, n)
            elif r.decision == PASS:
                first_pass.setdefault(r.name, n)
        if rollback_at is None and overall(results) == FAIL:
            rollback_at = n
        if stop_on is not None and (stop_on in first_fail or stop_on in first_pass):
            break
    return Outcome(first_fail, first_pass, rollback_at, results)


def wilson(hits: int, runs: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson interval for a share of runs."""
    if runs == 0:
        return 0.0, 1.0
    p = hits / runs
    centre = (p + z * z / (2 * runs)) / (1 + z * z / runs)
    half = z * math.sqrt(p * (1 - p) / runs + z * z / (4 * runs * runs)) / (1 + z * z / runs)
    return max(centre - half, 0.0), min(centre + half, 1.0)
