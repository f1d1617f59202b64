"""The PD path: a prefill leg with max_tokens=1, then a decode leg, joined the way vLLM's
disaggregated proxies join them.

The request id is chosen once and used on both legs. The prefill leg carries the connector's
prefill parameters (`do_remote_decode` by default); whatever `kv_transfer_params` prefill returns
goes into the decode request unchanged. What decode is given is the connector's `decode_prompt`
setting: the original prompt (NIXL/P2P proxies) or the prompt plus prefill's first token
(ExampleConnector's offline convention), in which case prefill's token opens the output.
"""

from __future__ import annotations

import msgspec

from pdcheck.cluster.instance import Instance
from pdcheck.config import ConnectorSpec, DecodePrompt
from pdcheck.types import GenRequest, GenResult, PDResult


def prefill_request(request: GenRequest, connector: ConnectorSpec, decode: Instance) -> GenRequest:
    """`{decode_addr}` in the connector's prefill parameters is the decode instance's address."""
    filled = {k: v.format(decode_addr=f"127.0.0.1:{decode.port}") if isinstance(v, str) else v
              for k, v in connector.prefill_params}
    params = filled | (request.kv_transfer_params or {})
    return msgspec.structs.replace(request, max_tokens=1, kv_transfer_params=params, **abort_on(request, "prefill"))


def abort_on(request: GenRequest, leg: str) -> dict:
    """The request's client abort, kept on the leg it is planned for and dropped from the other."""
    return {} if request.abort_leg == leg else {"abort_step": None}


# vLLM's prefill scheduler adds this accounting field; on decode it would replace decode's own
# cached-token count with prefill's, hiding what decode loaded. It is not connector data.
ACCOUNTING_KEYS = ("remote_prefill_cached_tokens",)
ABANDONED = "abandoned by the client between the legs (decode leg never sent)"


def decode_request(request: GenRequest, prefilled: GenResult, connector: ConnectorSpec) -> GenRequest:
    prompt, max_tokens = request.prompt, request.max_tokens
    params = prefilled.kv_transfer_params
    if params:
        params = {k: v for k, v in params.items() if k not in ACCOUNTING_KEYS}
    if connector.decode_prompt is DecodePrompt.WITH_FIRST_TOKEN:
        prompt, max_tokens = prompt + prefilled.token_ids[:1], max_tokens - 1
    return msgspec.structs.replace(request, prompt=prompt, max_tokens=max_tokens, kv_transfer_params=params,
                                   **abort_on(request, "decode"))


def join(prefilled: GenResult, decoded: GenResult, connector: ConnectorSpec) -> GenResult:
    if connector.decode_prompt is DecodePrompt.ORIGINAL or not decoded.ok:
        return decoded
    return msgspec.structs.replace(
        decoded,
        token_ids=prefilled.token_ids[:1] + decoded.token_ids,
        logprobs=prefilled.logprobs[:1] + decoded.logprobs,
        top_logprobs=prefilled.top_logprobs[:1] + decoded.top_logprobs,
    )


def run_pd(
    prefill: Instance, decode: Instance, connector: ConnectorSpec, requests: list[GenRequest], deadline_s: float,
    between=None,
) -> list[PDResult]:
    """Both legs for a batch of requests: prefill runs them together, then (after `between()`,
    if given) decode does, unless `between()` says the client abandoned the batch: then decode
    never hears of it, and each request ends as that error."""
    prefilled = prefill.generate([prefill_request(r, connector, decode) for r in requests], deadline_s)
    if between and between():
        return [PDResult(result=msgspec.structs.replace(p, token_ids=[], error=p.error or ABANDONED), external_tokens=0,
                         prefill=p) for p in prefilled]
    to_decode = [(r, p) for r, p in zip(requests, prefilled) if p.ok]
    decoded = decode.generate([decode_request(r, p, connector) for r, p in to_decode], deadline_s)
    by_id = {d.request_id: d for d in decoded}
    results = []
    for p in prefilled:
        d = by_id.get(p.request_id)
        joined = p if d is None else join(p, d, connector)
        results.append(PDResult(result=joined, external_tokens=d.external_tokens if d else 0, prefill=p,
                                local_tokens=d.local_cached_tokens if d else 0))
    return results


class LegsClient:
    """The two legs in process, to the pair the deployment plans for each batch (its `pair(i)`);
    an instance of that pair that died since it started is restarted first."""

    def __init__(self, deployment):
        self.deployment = deployment

    def pair(self, batch: int) -> tuple[Instance, Instance]:
        return self.deployment.pair(batch)

    def send(self, requests: list[GenRequest], batch: int, deadline_s: float, between=None) -> list[PDResult]:
        pair = self.pair(batch)
        self.deployment.revive(pair)
        return run_pd(*pair, self.deployment.spec.connector, requests, deadline_s, between)
