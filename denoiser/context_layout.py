"""The token layout of a native model's context, shared by inference and training.

`<fim_suffix> suffix <fim_prefix> preamble prefix <fim_middle>`: the suffix comes
first so that typing, which extends the prefix, only ever changes the end of the
context (the cached keys and values before it stay valid). Training lays out its
examples with this very function, so the model sees at inference exactly what it
learnt. Works on token ids only; tokenizing is the caller's.
"""
from __future__ import annotations

from denoiser.config import FIM_MIDDLE_ID, FIM_PREFIX_ID, FIM_SUFFIX_ID

# A prefix too long for its room loses whole multiples of this many tokens from its
# start (at most a quarter of the room), so the cut stays put while the user types.
PREFIX_CUT_QUANTUM = 64


def context_ids(preamble: list[int], prefix: list[int], suffix: list[int], budget: int) -> list[int]:
    """`<fim_suffix> suffix <fim_prefix> preamble prefix <fim_middle>` within `budget` tokens.

    The suffix keeps its start (at most a quarter of the room), the preamble its
    start, the prefix its end (the text at the cursor). A prefix that does not
    fit is cut at a multiple of a fixed quantum of tokens, not at exactly the
    room: cutting exactly would move the first prefix token on every keystroke
    and invalidate the cached keys and values of everything after the suffix.
    """
    room = max(0, budget - 3)
    suffix = suffix[: min(len(suffix), room // 4)]
    room -= len(suffix)
    preamble = preamble[: room // 4]
    room -= len(preamble)
    if len(prefix) > room:
        quantum = max(1, min(PREFIX_CUT_QUANTUM, room // 4))
        prefix = prefix[-(-(len(prefix) - room) // quantum) * quantum:]
    return [FIM_SUFFIX_ID, *suffix, FIM_PREFIX_ID, *preamble, *prefix, FIM_MIDDLE_ID]
