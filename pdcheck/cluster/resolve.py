"""Which class a connector name resolves to, asked of a child of the engine forkserver.

The forkserver has imported vLLM already, so a child answers in well under a second, and this
process never imports vLLM or the user's connector module itself (a process that has imported
vLLM already, such as `pdcheck serve`, is answered in place). Answers are kept per name.
"""

from __future__ import annotations

import sys

from pdcheck.cluster import worker
from pdcheck.cluster.instance import engine_context, have_vllm
from pdcheck.errors import BadInput

TIMEOUT_S = 120.0
_known: dict[str, list[str]] = {}


def lineage(connector) -> list[str]:
    """The MRO of `connector`'s class as qualified names (`module.Class`), nearest first; empty
    where vLLM is not installed. BadInput where the class cannot be loaded."""
    if not have_vllm():
        return []
    if connector.name not in _known and "vllm" in sys.modules:
        _known[connector.name] = worker.lineage_of(worker.connector_class(connector))
    if connector.name not in _known:
        context = engine_context()
        receiver, sender = context.Pipe(duplex=False)
        child = context.Process(target=worker.report_lineage, args=(sender, connector), name="pdcheck-resolve",
                                daemon=True)
        child.start()
        sender.close()
        try:
            answer = receiver.recv() if receiver.poll(TIMEOUT_S) else f"connector {connector.name!r}: no answer"
        except EOFError:
            answer = f"connector {connector.name!r}: loading it killed the process that tried"
        finally:
            receiver.close()
            child.join(5)
            if child.is_alive():
                child.kill()
                child.join()
            child.close()
        if isinstance(answer, str):
            raise BadInput(answer)
        _known[connector.name] = answer
    return _known[connector.name]
