"""MoE shape checks: implementations compared with a float64 reference at chunk and tile edges.

reference.py is the float64 forward; chunked.py a chunked MoE in the input dtype; vllm_cpu.py
calls vLLM's CPU fused-MoE op on tensors; cases.py builds a case's inputs, compares, and writes
the replay line. The mutant is in pdcheck/mutants/moe.py, the suite in suites/test_moe_shapes.py.

What vLLM 0.32 (vllm-cpu 0.32.0) runs for unquantized MoE on CPU, read from the installed package
(paths under vllm/model_executor/layers/fused_moe/ unless they say otherwise):

- Kernel choice: oracle/unquantized.py:160-174 tries X86CPUUnquantizedExperts (AMX, bfloat16
  only, needs AMX tiles: experts/cpu_moe.py:318), the Arm and Power ones, then the portable
  CPUUnquantizedExperts (experts/cpu_moe.py:85, isa "vec"). This machine has no AMX, so float32
  and bfloat16 both run "vec".
- Nothing on this path chunks by a chunk size. modular_kernel.py:1286-1292 (`_fused_experts`)
  sizes its buffers with the full token count as the chunk and calls the experts once ("there
  is only one chunk", :1117); upstream removed fused-MoE chunking (vLLM PR #34086, "Remove
  Chunking From FusedMoE"). The Triton path takes all tokens at once too (fused_moe.py:1701-1708,
  GPU only). The only token loops left under fused_moe/ are in FlashInfer TRT-LLM GPU experts
  (experts/trtllm_nvfp4_moe.py:426-446, experts/trtllm_mxfp4_moe.py:454-458), sized by the CUDA
  grid limit, not by an environment variable.
- VLLM_FUSED_MOE_CHUNK_SIZE is not defined in vllm/envs.py and nothing in the package reads it
  (no .py file or compiled library names it). Setting it only earns the warning "Unknown vLLM
  environment variable detected" (vllm/platforms/interface.py:1446-1459). It cannot lower any
  boundary here; the suite draws boundary shapes itself.
- CPUUnquantizedExperts: process_weights_after_loading (experts/cpu_moe.py:208) zero-pads the
  intermediate size to a multiple of 32 (`_pad_moe_intermediate`, :220) and prepacks w13 and w2
  (`cpu_prepack_moe_weight`, vllm/_custom_ops.py:4467); `apply` (:269, the call at :303) runs
  `cpu_fused_moe` (vllm/_custom_ops.py:4485, torch.ops._C.cpu_fused_moe) on the whole batch;
  `workspace_shapes` (:252) asks for no workspace: the op keeps its own scratch.
- Inside the op (upstream csrc/cpu/cpu_fused_moe.cpp; the wheel ships only the compiled library):
  all tokens x top_k rows are grouped by expert, and each expert's rows go through the gate/up
  and down matmuls in tiles of MaxMSize rows (8 for "vec", csrc/cpu/micro_gemm/
  cpu_micro_gemm_vec.hpp; 32 for AMX), the last tile of each expert partial; columns are split
  into tiles sized from the L2 cache and the thread count. Its remainders are per-expert row
  counts that are not multiples of 8, not a chunk of tokens; random routing over 1 to ~200
  tokens reaches them.
- It can be called directly (vllm_cpu.py), after importing vllm._custom_ops, with no engine or
  config. Seen on this build: the hidden size must be a multiple of 32 (RuntimeError "Check
  failed: output_size % 32 == 0" from the prepack, cpu_fused_moe.cpp:666 of the compiled build)
  and 2 x intermediate a multiple of 64 (cpu_fused_moe.cpp:95), which the padding gives; top-k
  weights float32 and ids int32, contiguous (router/cpu_router.py:248-251).
  CPUUnquantizedExperts refuses hidden sizes that are not multiples of 32 before that
  (`_supports_grouped_gemm`, experts/cpu_moe.py:112).
"""
