"""Turn (prompt, response) text pairs into token ids with response-only labels."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dda_kernel import IGNORE_INDEX


class SequenceTooLongError(ValueError):
    """A prompt + response does not fit the model's context."""


def encode_pair(
    tokenizer: Any, prompt: str, response: str, max_length: int, name: str = "sample"
) -> tuple[list[int], list[int]]:
    """Token ids of prompt + response (+ EOS) and labels that mask the prompt with ``IGNORE_INDEX``.

    Raises :class:`SequenceTooLongError` when the pair exceeds ``max_length`` tokens: nothing is
    truncated silently.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = [*response_ids, tokenizer.eos_token_id]
    ids = [*prompt_ids, *response_ids]
    if len(ids) > max_length:
        raise SequenceTooLongError(
            f"{name} has {len(ids)} tokens, more than the maximum of {max_length}: shorten it or raise max_length"
        )
    return ids, [IGNORE_INDEX] * len(prompt_ids) + list(response_ids)


def encode_pairs(
    tokenizer: Any, pairs: Sequence[tuple[str, str]], max_length: int, names: Sequence[str] | None = None
) -> list[tuple[list[int], list[int]]]:
    """:func:`encode_pair` over many pairs; errors name the sample (``names[i]`` or its index)."""
    return [
        encode_pair(tokenizer, p, r, max_length, name=f"sample {names[i]!r}" if names else f"sample #{i}")
        for i, (p, r) in enumerate(pairs)
    ]


def word_level_tokenizer(texts: Sequence[str]) -> Any:
    """A whitespace word-level Hugging Face fast tokenizer trained offline on ``texts``.

    Special tokens: ``[PAD]`` (id 0), ``[UNK]``, ``[EOS]``. For models trained from scratch.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[EOS]"]))
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
