"""Mutants and negative controls: code that is wrong on purpose, each a few lines from the correct
code, so that a suite can prove it catches the bug class it guards.

`catalogue` lists every mutant with its bug class and the test that catches it, by name only
(listing it imports no mutant); the other modules hold the mutants of one part each: the
reference connector (`connector`, `protocol`, `layouts`), the NCCL plane (`gpu`), vLLM's NIXL
connector (`nixl`), the proxy (`proxy`), the MoE forward (`moe`), and the negative controls
(`controls`). The product never runs a mutant unless it is named, as a connector or by
`pdcheck mutants`.
"""
