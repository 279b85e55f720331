"""Fill-in-the-middle (Code Llama, section 2.3): a document split at two uniformly random
character positions into prefix, middle and suffix, laid out as the infilling prompt that
`formats.encode_infill` builds at inference, followed by the middle and <EOT>:

    PSM: bos <PRE> prefix <SUF> suffix <MID> middle <EOT>
    SPM: bos <PRE> <SUF> suffix <MID> prefix middle <EOT>

The suffix and the middle continue other text, so they are encoded without SentencePiece's
dummy space (as the generated middle is decoded at inference). Which documents are split, and
where, is drawn from a generator the caller seeds (the run's seed, step and row), so a
resumed run transforms exactly what the uninterrupted one did.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..formats import INFILL_PIECES, encode_infill, infill_ids
from ..tokenizer import Tokenizer


def fim_ids(
    tokenizer: Tokenizer, prefix: str, middle: str, suffix: str, suffix_first: bool
) -> list[int]:
    """A document's tokens in the infilling layout: the inference prompt, then the answer."""
    prompt = encode_infill(tokenizer, prefix, suffix, suffix_first=suffix_first)
    eot = infill_ids(tokenizer)["eot"]
    return prompt + tokenizer.encode(middle, dummy_prefix=False) + [eot]


@dataclass
class FimTransform:
    """Turns a stored document (`bos ids eos`) into its training tokens: with probability
    `rate` the infilling layout (SPM with probability `spm_rate`, else PSM), otherwise
    unchanged."""

    tokenizer: Tokenizer
    rate: float = 0.9
    spm_rate: float = 0.5

    def __post_init__(self) -> None:
        try:
            infill_ids(self.tokenizer)
        except ValueError:
            pieces = ", ".join(INFILL_PIECES.values())
            raise ValueError(
                f"fim_rate {self.rate} needs Code Llama's infilling pieces ({pieces}) in the "
                f"tokenizer, and {self.tokenizer.source} lacks them: extend the model "
                "(llama2 convert --add-infill-tokens) or train a tokenizer with "
                "--infill-pieces"
            ) from None

    def __call__(self, doc: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        # four draws per document whatever its fate, so that one document's outcome never
        # shifts the next one's draws
        apply, spm, u, v = rng.random(4)
        if apply >= self.rate:
            return doc
        tok = self.tokenizer
        body = doc[1:] if len(doc) and doc[0] == tok.bos_id else doc
        body = body[:-1] if len(body) and body[-1] == tok.eos_id else body
        text = tok.decode(body.tolist())
        # two split points, each uniform over the character positions 0 .. len(text)
        i, j = sorted(min(int(x * (len(text) + 1)), len(text)) for x in (u, v))
        ids = fim_ids(tok, text[:i], text[i:j], text[j:], suffix_first=spm < self.spm_rate)
        return np.asarray(ids, dtype=np.int64)
