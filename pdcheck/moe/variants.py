"""Variants of the tiny Qwen3-MoE model that put MoE routing at its edges, made at test time.

    python -m pdcheck.moe.variants one-expert runs/moe-variants   # prints the variant's folder

A variant is a copy of fixtures/models/tiny-qwen3-moe (tokenizer files as they are) with
config.json's `num_experts_per_tok` rewritten and, for `one-expert`, some weights rewritten:

- `top1`: top-k 1, the base's random router (each token to its own best expert);
- `top8`: top-k 8 = every expert (every token to all of them);
- `one-expert`: top-k 1 and every token, in every layer, to expert ONE_EXPERT.

How `one-expert` routes every token to one expert, provably. vLLM's CPU router takes torch.topk
of the gate's logits, and the gate's input is the post-attention RMSNorm of the residual stream.
Router and norm weights alone cannot do it, and tied logits leave the pick to torch.topk's
tie-breaking, an accident of the sort kernel (docs/moe.md says why). Instead, hidden channel
CHANNEL of the residual stream is made a constant:

- every token's embedding has CHANNEL_VALUE (> 0) in that channel;
- no layer writes into it: row CHANNEL of every o_proj and of every expert's down_proj is zero,
  so attention and MoE outputs add exactly 0 there (0 x finite, summed, is 0 in any order);
- so at every layer's post-attention norm the channel holds exactly CHANNEL_VALUE, and the
  norm (weight 1 there) makes it CHANNEL_VALUE / rms(x) > 0;
- the gate's row for ONE_EXPERT is CHANNEL_VALUE at that channel and 0 elsewhere, every other
  row is 0: ONE_EXPERT's logit is > 0 and every other logit is exactly 0, for any token.

The rest of the model stays random, so prompts still change the KV and the tokens.
`routed_experts` checks it on real hidden states: Hugging Face's forward with a hook on each
layer's gate input, then vLLM's own CPU routing function on those logits.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import shutil
from collections import Counter
from pathlib import Path

BASE_MODEL = "tiny-qwen3-moe"
ONE_EXPERT = 7  # not topk's tie-break pick (6): the route must come from the weights
CHANNEL = 0
CHANNEL_VALUE = 1.0
REWRITTEN = ("config.json", "model.safetensors")


@dataclasses.dataclass(frozen=True)
class Variant:
    """`expert`: the one expert every token goes to (needs top_k 1), or None for the base router."""

    name: str
    top_k: int
    expert: int | None = None

    def __post_init__(self):
        if self.top_k < 1:
            raise ValueError(f"variant {self.name!r}: top_k {self.top_k} must be at least 1")
        if self.expert is not None and self.top_k != 1:
            raise ValueError(f"variant {self.name!r}: expert {self.expert} needs top_k 1, not {self.top_k}")


VARIANTS = {v.name: v for v in (Variant("one-expert", 1, ONE_EXPERT), Variant("top1", 1), Variant("top8", 8))}


def make_variant(variant: Variant, out_dir: Path, base: Path | None = None) -> Path:
    """Write `<out_dir>/<base name>-<variant>/` and return it (rewritten if it exists)."""
    from pdcheck.config import model_path

    base = base or model_path(BASE_MODEL)
    config = json.loads((base / "config.json").read_text())
    check_fits(variant, config)
    folder = out_dir / f"{base.name}-{variant.name}"
    folder.mkdir(parents=True, exist_ok=True)
    for path in base.iterdir():
        if path.name not in REWRITTEN:
            shutil.copy2(path, folder / path.name)
    (folder / "config.json").write_text(json.dumps({**config, "num_experts_per_tok": variant.top_k},
                                                   indent=2, sort_keys=True) + "\n")
    if variant.expert is None:
        shutil.copy2(base / "model.safetensors", folder / "model.safetensors")
    else:
        rewrite_weights(base / "model.safetensors", folder / "model.safetensors", config, variant.expert)
    return folder


def check_fits(variant: Variant, config: dict) -> None:
    experts = config["num_experts"]
    if variant.top_k > experts:
        raise ValueError(f"variant {variant.name!r}: top_k {variant.top_k} exceeds the {experts} experts")
    if variant.expert is not None and not 0 <= variant.expert < experts:
        raise ValueError(f"variant {variant.name!r}: expert {variant.expert} is not one of the {experts} experts")
    if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
        raise ValueError(f"variant {variant.name!r}: every layer must be a MoE layer")


def rewrite_weights(source: Path, target: Path, config: dict, expert: int) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), "pt") as f:
        metadata = f.metadata()
        weights = {name: f.get_tensor(name) for name in f.keys()}
    save_file(route_to_one_expert(weights, config, expert), str(target), metadata=metadata)


def route_to_one_expert(weights: dict, config: dict, expert: int) -> dict:
    """The weights with channel CHANNEL held constant and every gate pointing at `expert`."""
    out = dict(weights)

    def rewritten(name: str, edit) -> None:
        tensor = weights[name].clone()
        edit(tensor)
        out[name] = tensor

    rewritten("model.embed_tokens.weight", lambda t: t[:, CHANNEL].fill_(CHANNEL_VALUE))
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        rewritten(p + "self_attn.o_proj.weight", lambda t: t[CHANNEL].zero_())
        for e in range(config["num_experts"]):
            rewritten(f"{p}mlp.experts.{e}.down_proj.weight", lambda t: t[CHANNEL].zero_())
        rewritten(p + "post_attention_layernorm.weight", lambda t: t[CHANNEL].fill_(1.0))
        rewritten(p + "mlp.gate.weight", functools.partial(point_at, expert))
    return out


def point_at(expert: int, gate) -> None:
    """A gate whose only non-zero weight reads channel CHANNEL into `expert`'s logit."""
    gate.zero_()
    gate[expert, CHANNEL] = CHANNEL_VALUE


def router_inputs(model_dir: Path, prompts: list[list[int]], dtype: str) -> list[list]:
    """Per layer, per prompt: the gate's input hidden states (Hugging Face's forward, hooked)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
    layers = model.model.layers
    seen: list[list] = [[] for _ in layers]
    hooks = [layer.mlp.gate.register_forward_pre_hook(lambda _m, args, i=i: seen[i].append(args[0].detach()))
             for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for prompt in prompts:
                model(torch.tensor([prompt]))
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def routed_experts(model_dir: Path, prompts: list[list[int]], dtype: str) -> list[Counter]:
    """Per layer, how many token rows vLLM's CPU router sends to each expert, over all prompts."""
    import torch
    from safetensors import safe_open
    from vllm.model_executor.layers.fused_moe.router.cpu_router import select_experts

    config = json.loads((model_dir / "config.json").read_text())
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        gates = [f.get_tensor(f"model.layers.{i}.mlp.gate.weight").to(getattr(torch, dtype))
                 for i in range(config["num_hidden_layers"])]
    counts = []
    for gate, hidden in zip(gates, router_inputs(model_dir, prompts, dtype)):
        counter: Counter = Counter()
        for h in hidden:
            logits = torch.nn.functional.linear(h, gate)
            _, ids = select_experts(h, logits, config["num_experts_per_tok"], use_grouped_topk=False,
                                    renormalize=config["norm_topk_prob"])
            counter.update(ids.flatten().tolist())
        counts.append(counter)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", choices=sorted(VARIANTS))
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    print(make_variant(VARIANTS[args.variant], args.out_dir))


if __name__ == "__main__":
    main()
