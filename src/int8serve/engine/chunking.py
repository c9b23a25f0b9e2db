"""How a prefill chunk is computed: by the same operations whatever the prefix cache supplied before it.

A prompt is prefilled in chunks that end at multiples of the engine's `prefill_chunk`, counted from its first
token, so the chunk holding a position is [a·C, (a+1)·C) (or shorter, at the prompt's end) with or without reuse:
reuse only removes positions from the front of a chunk. The numbers of a row must then not depend on how many rows
are computed with it, nor on where the chunk ends:

* an int8 layer chooses its kernel by the size of a whole chunk, `prefill_chunk` rows, not by the rows it is given
  nor by where the prompt ends: the kernels round differently (int8 activations or bf16 dense), and positions that
  two prompts share must be computed by the same one in both, whatever their lengths (the kernels compute each row
  on its own; a dense fp32 matmul rounds a row by how many come with it below ~12, so it is given at least 16);
* where the dense path's matmul rounds a row by how many come with it at any count (oneDNN's bf16 on AMX CPUs:
  `int8.dense_rows_independent`), it is given the whole aligned chunk: `rows` rows, the call's at their offsets in
  the chunk and zeros elsewhere (`PrefillChunk.placements`), so that a row is computed in the same company whether
  the cache supplied the rows before it or not;
* attention sees the keys up to the end of the aligned chunk, [0, (a+1)·C) — the positions past the prompt are
  zeros, and masked — with the queries at their places among the whole chunk's rows (padding elsewhere): SDPA
  rounds a row by the size of the block of queries it multiplies it in (Attention._prefill_attention).

Row-exact chunks (`row_exact`, where the model can: `Transformer.row_exact_prefill`) go further: every row is computed
with exactly the operations a decode step gives that token at that position — int8 layers through the decode kernel
with fp32 outputs (its rows are bitwise independent), attention through the decode attention kernel (each row over
keys [0, own position]), per-row norms, rope and SiLU. A chunk's numbers then depend neither on its length nor on
where it ends, and the keys and values decode writes are the ones prefill would write, so the prefix cache can keep
a reply's generated tokens too (scheduler.py).

Several aligned chunks of one prompt may go through one forward (`aligned_chunk(..., chunks=n)`: the scheduler does
so for a prompt alone in the engine, `Engine(solo_prefill_tokens=...)`), where every row's numbers are those the
chunks give one by one: the int8 layers choose by the chunk's rows and compute each row on its own (only where they
do: `Transformer.prefill_rows_independent`), and attention runs once per aligned chunk (`PrefillChunk.pieces`), with
that chunk's queries and keys, as its own forward would. The weights are then read, and on the bf16 prefill kernel
made into tiles, once for all of them instead of once a chunk.

`PrefillChunk` carries this to the layers for the duration of one forward (`Transformer(..., prefill=...)`).
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

__all__ = ["CURRENT", "PrefillChunk", "aligned_chunk"]


@dataclass(frozen=True)
class PrefillChunk:
    rows: int  # the rows of a whole chunk (prefill_chunk): the layers choose their kernel by this
    keys_end: int  # attention sees positions [0, keys_end): the end of the (last) aligned chunk
    row_exact: bool = False  # every row computed as its decode step would be (see above)
    ends: tuple[int, ...] = ()  # where each sequence's rows of this forward end (set by Transformer.forward)

    def pieces(self, start: int, count: int) -> list[tuple[int, int, int]]:
        """The aligned chunks of a forward of `count` rows from position `start`: (first row, rows, the end of the
        keys it attends to) each, in order; one piece for a single chunk."""
        pieces, row = [], 0
        while row < count:
            position = start + row
            chunk_end = (position // self.rows + 1) * self.rows
            rows = min(count - row, chunk_end - position)
            pieces.append((row, rows, min(self.keys_end, chunk_end)))
            row += rows
        return pieces

    def placements(self, count: int) -> list[tuple[int, int, int]]:
        """Where the `count` rows of a call in this forward lie in their aligned chunks: (first row, rows, offset in
        the chunk) each, in order. A call's rows are the last count / len(ends) of each sequence's: all of them, or
        its last one only (the last layer past attention, the output head)."""
        if not self.ends or count % len(self.ends):
            raise ValueError(f"{count} rows for {len(self.ends)} sequences")
        per = count // len(self.ends)
        return [(sequence * per + first, rows, (end - per + first) % self.rows)
                for sequence, end in enumerate(self.ends) for first, rows, _ in self.pieces(end - per, per)]


CURRENT: contextvars.ContextVar[PrefillChunk | None] = contextvars.ContextVar("int8serve_prefill_chunk",
                                                                             default=None)


def aligned_chunk(prefilled: int, prompt_tokens: int, chunk_tokens: int, max_positions: int, row_exact: bool = False,
                  chunks: int = 1) -> tuple[int, PrefillChunk]:
    """The end of the next `chunks` aligned chunks of a prompt prefilled up to `prefilled` (fewer at its end), and how
    the layers compute them."""
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    start = prefilled // chunk_tokens * chunk_tokens  # where this chunk starts when nothing is reused
    end = min(prompt_tokens, start + chunks * chunk_tokens)
    last_start = max(start, (end - 1) // chunk_tokens * chunk_tokens)  # the last aligned chunk's first position
    return end, PrefillChunk(rows=chunk_tokens, keys_end=min(max_positions, last_start + chunk_tokens),
                             row_exact=row_exact)
