"""A pdcheck reproducer, standalone: it needs vLLM and torch only (and safetensors, which vLLM
installs). `pdcheck repro FILE --export SCRIPT` writes this module's source with the failure's
settings (PARAMS) and the tiny model's weight recipe appended.

It makes the model from its config and seed in a temporary folder, starts a prefill engine, a
decode engine (joined by the connector under test) and a single baseline engine, each in its
own process, sends the prompts in order through both legs and through the baseline, and checks
the last one: the PD output must equal the baseline's, token for token. It exits 1 with the
reason when that fails (the bug reproduces), 0 when it does not.
"""

import json
import multiprocessing
import os
import shutil
import socket
import sys  # noqa: F401 (the exported script ends with sys.exit(main(...)))
import tempfile

ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "TORCHDYNAMO_DISABLE": "1",
       "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def write_model(folder, config, seed, make_weights):
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    save_file(make_weights(config, seed), os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})


def engine_main(conn, model, engine, kv_config, env):
    os.environ.update(env)  # the connector's per-instance settings, read when the engine is built
    from vllm import EngineArgs, LLMEngine, SamplingParams
    from vllm.config import KVTransferConfig

    args = EngineArgs(model=model, skip_tokenizer_init=True, dtype=engine["dtype"], max_model_len=engine["max_model_len"],
                      block_size=engine["block_size"], enforce_eager=True, distributed_executor_backend="uni", seed=0,
                      enable_prefix_caching=engine["prefix_caching"], num_gpu_blocks_override=engine["num_blocks"],
                      kv_transfer_config=KVTransferConfig(**kv_config) if kv_config else None)
    llm = LLMEngine.from_engine_args(args)
    conn.send("ready")
    while (job := conn.recv()) is not None:
        request_id, prompt, max_tokens, params = job
        sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                  extra_args={"kv_transfer_params": params} if params else None)
        try:
            llm.add_request(request_id, {"prompt_token_ids": prompt}, sampling)
            result = None
            while result is None:
                result = next((o for o in llm.step() if o.finished), None)
            conn.send((list(result.outputs[0].token_ids), result.kv_transfer_params, None))
        except Exception as e:  # the failure under report: hand it to the checker
            conn.send(([], None, f"{type(e).__name__}: {e}"))


class Engine:
    def __init__(self, name, model, engine, kv_config, env=None):
        self.name = name
        self.conn, child = multiprocessing.get_context("spawn").Pipe()
        self.process = multiprocessing.get_context("spawn").Process(
            target=engine_main, args=(child, model, engine, kv_config, env or {}), daemon=True)
        self.process.start()

    def wait_ready(self, timeout_s=300):
        if not self.conn.poll(timeout_s) or self.conn.recv() != "ready":
            raise RuntimeError(f"the {self.name} engine did not start")

    def generate(self, request_id, prompt, max_tokens, params=None, timeout_s=120):
        self.conn.send((request_id, prompt, max_tokens, params))
        if not self.conn.poll(timeout_s):
            return [], None, f"no answer from the {self.name} engine within {timeout_s}s (hang)"
        return self.conn.recv()

    def close(self):
        self.process.kill()
        self.process.join(10)
        self.conn.close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def filled(value, **names):
    if isinstance(value, str):
        return value.format(**names)
    if isinstance(value, dict):
        return {k: filled(v, **names) for k, v in value.items()}
    return value


def instance_env(params):
    """The connector's per-instance environment, each `{free_port}` a port of this instance's own."""
    return {k: v.replace("{free_port}", str(free_port())) for k, v in params["instance_env"].items()}


def pd_leg(prefill, decode, i, prompt, max_tokens, params):
    """Prefill with max_tokens=1, then decode with what prefill returned (and, for connectors
    that expect it, the prompt plus prefill's first token)."""
    rid = f"repro-{i}"
    first, returned, error = prefill.generate(rid, prompt, 1, params["prefill_params"])
    if error:
        return [], f"prefill: {error}"
    if params["decode_prompt"] == "with_first_token":
        tokens, _, error = decode.generate(rid, prompt + first[:1], max_tokens - 1, returned)
        return first[:1] + tokens, error and f"decode: {error}"
    returned = {k: v for k, v in (returned or {}).items() if k != "remote_prefill_cached_tokens"}
    tokens, _, error = decode.generate(rid, prompt, max_tokens, returned or None)
    return tokens, error and f"decode: {error}"


def main(params, make_weights):
    os.environ.update(ENV)
    work = tempfile.mkdtemp(prefix="pdcheck-repro-")
    os.environ["TMPDIR"] = work
    engines = []
    try:
        model = os.path.join(work, "model")
        write_model(model, params["config"], params["seed"], make_weights)
        prefill_port, decode_port = free_port(), free_port()
        kv = params["kv_transfer_config"]
        baseline = Engine("baseline", model, params["engine"], None)
        prefill = Engine("prefill", model, params["engine"], filled(kv["prefill"], run_dir=work, port=prefill_port),
                         instance_env(params))
        decode = Engine("decode", model, params["engine"], filled(kv["decode"], run_dir=work, port=decode_port),
                        instance_env(params))
        engines = [baseline, prefill, decode]
        for engine in engines:
            engine.wait_ready()
        params = dict(params, prefill_params=filled(params["prefill_params"], decode_addr=f"127.0.0.1:{decode_port}"))
        for i, (prompt, max_tokens) in enumerate(params["requests"]):
            expected, _, _ = baseline.generate(f"baseline-{i}", prompt, max_tokens)
            got, error = pd_leg(prefill, decode, i, prompt, max_tokens, params)
        print(f"recorded by pdcheck: {params['recorded']}")
        if error or got != expected:
            why = error or f"tokens differ: baseline {expected}, PD {got}"
            print(f"REPRODUCED: prompt of {len(prompt)} tokens: {why}")
            return 1
        print(f"did not reproduce: the prompt of {len(prompt)} tokens matched the baseline")
        return 0
    finally:
        for engine in engines:
            engine.close()
        shutil.rmtree(work, ignore_errors=True)
