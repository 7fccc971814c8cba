"""The token a model must produce to answer: shared by every experiment that scores a first answer token."""

from __future__ import annotations


def answer_token(tokenizer, prompt: str, continuation: str) -> int:
    """The first token the model must produce: the token after the prompt in the tokenization of
    prompt + continuation (so merges at the boundary are honoured), else the continuation's own first token."""
    p = tokenizer(prompt)["input_ids"]
    full = tokenizer(prompt + continuation)["input_ids"]
    if len(full) > len(p) and full[: len(p)] == p:
        return full[len(p)]
    return tokenizer(continuation, add_special_tokens=False)["input_ids"][0]
