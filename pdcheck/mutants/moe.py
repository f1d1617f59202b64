"""MoE mutants: pdcheck.moe.chunked's ChunkedMoE with one slice wrong, so the MoE shape suite
(suites/test_moe_shapes.py) can prove that it catches the bug class.

- TokensSlicedRemainder ("MoE chunk remainder" in BUGS.md, vLLM #13693; the same slip was fixed
  in SGLang #3679): the remainder chunk's activation buffer is sliced by the chunk's tokens
  instead of tokens x top_k. The activation step fills only that many rows; the down projection
  reads tokens x top_k rows from the buffer's start, so the rows past the slice still hold the
  previous chunk's activations. The output is silently wrong exactly when top_k > 1 and the
  tokens leave a remainder after at least one full chunk (more than `chunk_size // top_k`
  tokens and not a multiple of it); with top_k = 1, tokens and rows are the same number.

Loadable as `pdcheck.mutants.moe:<Name>` wherever an implementation path is taken
(pdcheck.moe.cases). Never ship it: it exists to be caught.
"""

from __future__ import annotations

from pdcheck.moe.chunked import ChunkedMoE, Scratch


class TokensSlicedRemainder(ChunkedMoE):
    def remainder_views(self, scratch: Scratch, num_tokens: int, top_k: int) -> Scratch:
        rows = num_tokens * top_k
        return Scratch(scratch.gate_up[:rows], scratch.act[:num_tokens], scratch.down[:rows])  # BUG: act by tokens


MUTANTS: dict[str, type[ChunkedMoE]] = {cls.__name__: cls for cls in (TokensSlicedRemainder,)}
