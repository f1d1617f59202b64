"""MoE shape checks: implementations compared with a float64 reference at chunk and tile edges.

reference.py is the float64 forward; chunked.py a chunked MoE in the input dtype; vllm_cpu.py
calls vLLM's CPU fused-MoE op on tensors; cases.py builds a case's inputs, compares, and writes
the replay line. The mutant is in pdcheck/mutants/moe.py, the suite in suites/test_moe_shapes.py.
Only vllm_cpu.py imports vLLM at import time (variants.py does when it checks a route).

What the code relies on from vLLM 0.32's CPU path: unquantized MoE runs one fused op over the
whole batch; nothing chunks it by a chunk size (VLLM_FUSED_MOE_CHUNK_SIZE is read by nothing), and
the op splits each expert's rows into tiles of 8 (32 with AMX), so the suite draws its boundary
shapes itself. Called directly, the op needs a hidden size that is a multiple of 32, float32 top-k
weights and int32 ids. The source reading behind this, with file and line references into vLLM,
is docs/moe.md: update it when a vLLM release changes the path.
"""
