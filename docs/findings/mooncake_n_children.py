#!/usr/bin/env python3
"""MooncakeConnector: the children of an n>1 request all carry the request's kv_transfer_params;
prefill serves the transfer_id once, so a child whose pull comes after the first child's was
served waits VLLM_MOONCAKE_ABORT_REQUEST_TIMEOUT for blocks that will never be ready, and fails.

Same setup as mooncake_dead_prefill.py beside it (vLLM, Mooncake's transfer engine over tcp,
VLLM_MOONCAKE_ABORT_REQUEST_TIMEOUT=10). One prefill leg; then on decode child 0 with the
decode parameters, and, once it has finished, child 1 with a copy of the same parameters, as
vLLM's server gives each child of an n=2 request (in the server they usually reach the engine
in one step and share one pull; this takes the case where they do not). Exits 1 with
REPRODUCED when child 1 fails, 0 when it returns child 0's tokens.

    python mooncake_n_children.py
"""

import os
import random
import shutil
import sys
import tempfile

from mooncake_dead_prefill import CONFIG, ENV, PREFILL_ENGINE_ID, PROMPT_LEN, Engine, make_model

MAX_TOKENS = 8


def main():
    os.environ.update(ENV)
    work = tempfile.mkdtemp(prefix="mooncake-n-children-")
    cache = os.path.join(work, "cache")
    os.environ.update(TMPDIR=work, VLLM_CACHE_ROOT=cache, XDG_CACHE_HOME=cache)
    engines = []
    try:
        model = os.path.join(work, "model")
        make_model(model)
        prefill = Engine("prefill", model, "kv_producer", PREFILL_ENGINE_ID)
        decode = Engine("decode", model, "kv_consumer")
        engines = [prefill, decode]
        for engine in engines:
            engine.wait_ready()
        prompt = [random.Random(0).randrange(4, CONFIG["vocab_size"]) for _ in range(PROMPT_LEN)]
        prefill.generate("R", prompt, 1, {"do_remote_decode": True, "transfer_id": "xfer-R"})
        params = {"do_remote_prefill": True, "remote_engine_id": PREFILL_ENGINE_ID,
                  "remote_bootstrap_addr": prefill.bootstrap, "transfer_id": "xfer-R"}
        first, _, _, seconds, _ = decode.generate("0_R", prompt, MAX_TOKENS, dict(params))
        print(f"child 0: {first} in {seconds:.1f} s")
        second, _, _, seconds, _ = decode.generate("1_R", prompt, MAX_TOKENS, dict(params))
        print(f"child 1: {second} in {seconds:.1f} s")
        if not second:
            print("REPRODUCED: child 1 of the same request failed: its pull of the same transfer_id waited out "
                  "VLLM_MOONCAKE_ABORT_REQUEST_TIMEOUT (10 s) on prefill")
            return 1
        print("did not reproduce: child 1 returned tokens")
        return 0
    finally:
        for engine in engines:
            engine.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
