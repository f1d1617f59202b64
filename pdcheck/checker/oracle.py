"""The oracle: a single engine with the PD engines' settings and no connector.

Results are cached per (prompt, max_tokens) for the life of the Oracle; `continuation` is the
output after some forced tokens (a request of the prompt plus those tokens), cached the same way,
so the tolerant rule can judge PD past a near-tie from PD's own prefix. Before its results are
trusted bitwise, `calibrate` runs the same requests again in another batch composition (each
alone, in reverse order). If the two agree bit for bit the strict rule applies; otherwise the
tolerant rule, with a logprob tolerance scaled from the largest self-difference seen.
"""

from __future__ import annotations

import msgspec

from pdcheck.checker.compare import first_divergence
from pdcheck.cluster.instance import Instance
from pdcheck.types import Calibration, GenRequest, GenResult, Rule

TOLERANCE_SCALE = 8.0
TOLERANCE_FLOOR = 1e-6


def unaborted(request: GenRequest) -> GenRequest:
    """What the oracle runs: the request as if its client had waited for the answer."""
    return msgspec.structs.replace(request, abort_step=None, abort_leg=None)


class Oracle:
    def __init__(self, instance: Instance, deadline_s: float = 120.0):
        self.instance = instance
        self.deadline_s = deadline_s
        self.cache: dict[tuple, GenResult] = {}
        self.calibration: Calibration | None = None

    @staticmethod
    def key(request: GenRequest) -> tuple:
        return tuple(request.prompt), request.max_tokens

    def results(self, requests: list[GenRequest]) -> list[GenResult]:
        """The oracle's output for each request (under each request's own id)."""
        missing = {self.key(r): unaborted(r) for r in requests if self.key(r) not in self.cache}
        if missing:
            for request, result in zip(missing.values(), self.instance.generate(list(missing.values()), self.deadline_s)):
                self.cache[self.key(request)] = result
        return [msgspec.structs.replace(self.cache[self.key(r)], request_id=r.request_id) for r in requests]

    def continuation(self, request: GenRequest, forced: list[int]) -> GenResult:
        """The oracle's output after `forced`: prompt + forced, for the max_tokens left."""
        rest = msgspec.structs.replace(request, prompt=request.prompt + list(forced),
                                       max_tokens=request.max_tokens - len(forced))
        return self.results([rest])[0] if rest.max_tokens > 0 else GenResult(request.request_id)

    def calibrate(self, requests: list[GenRequest]) -> Calibration:
        batched = self.results(requests)
        alone = [self.instance.generate([unaborted(r)], self.deadline_s)[0] for r in reversed(requests)][::-1]
        token_mismatch = sum(first_divergence(a.token_ids, b.token_ids) is not None for a, b in zip(batched, alone))
        diffs = [abs(x - y) for a, b in zip(batched, alone) for x, y in zip(a.logprobs, b.logprobs)]
        self_diff = max(diffs, default=0.0)
        if token_mismatch == 0 and self_diff == 0.0:
            self.calibration = Calibration(Rule.STRICT, 0.0, 0.0, "oracle bitwise stable across batch compositions")
        else:
            tolerance = max(TOLERANCE_SCALE * self_diff, TOLERANCE_FLOOR)
            detail = (f"oracle not bitwise stable across batch compositions ({token_mismatch} token sequences "
                      f"differ, logprobs by up to {self_diff:.3g}): tolerant rule, tolerance {tolerance:.3g}")
            self.calibration = Calibration(Rule.TOLERANT, tolerance, self_diff, detail)
        return self.calibration
