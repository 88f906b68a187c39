"""The default setup in one call: ``dspark_ext.load_default()`` gives the target, tokenizer,
drafter and cost profile that ``dspark generate`` uses by default.

``default_drafter(target)`` is the one place that decides which drafter that is.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

import torch


def default_drafter_path() -> Path:
    """The shipped DSpark drafter for SmolLM2-135M-Instruct (package data)."""
    from dspark_ext.drafters.dspark import shipped_drafter_path

    return shipped_drafter_path()


def default_drafter(target, batch_sizes: Sequence[int] = (1,)) -> Tuple[object, object]:
    """(drafter, cost profile): the default drafter on ``target`` (prompt lookup + the shipped
    DSpark drafter, ``dspark_ext.drafters.hybrid``) and this machine's cost profile for those
    batch sizes (measured on first use, about 20 s, then cached). It makes the target return
    the features of the DSpark drafter's context layers."""
    from dspark_ext.drafters.hybrid import default_hybrid_drafter

    drafter = default_hybrid_drafter(target)
    return drafter, drafter.cost_profile(target, list(batch_sizes))


def encode_prompt(tokenizer, text: str, chat: bool = True) -> torch.Tensor:
    """1-D int64 token ids of ``text``: as one user turn of the chat template when ``chat`` and the
    tokenizer has one, else the raw text."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        if not isinstance(ids, list):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
    else:
        ids = tokenizer(text)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


@dataclass
class DefaultSetup:
    """What ``load_default`` returns; pass ``target``, ``drafter`` and ``cost`` to
    ``dspark_ext.generate``."""

    target: object
    tokenizer: object
    drafter: object
    cost: object  # dspark_ext.cost_profile.CostProfile

    def encode(self, text: str, chat: bool = True) -> torch.Tensor:
        return encode_prompt(self.tokenizer, text, chat)

    def decode(self, token_ids) -> str:
        ids: List[int] = torch.as_tensor(token_ids).tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def load_default(device="cpu", dtype: torch.dtype = torch.float32, cache_dir=None,
                 batch_sizes: Sequence[int] = (1,)) -> DefaultSetup:
    """The default target (SmolLM2-135M-Instruct, see ``dspark_ext.targets.load_default_model``)
    returning the features the default drafter reads, its tokenizer, the default drafter and this
    machine's cost profile for ``batch_sizes`` (the numbers of prompts you will generate together)."""
    from dspark_ext.targets import load_target

    target, tokenizer = load_target(None, device=device, dtype=dtype, cache_dir=cache_dir,
                                    drafter_path=default_drafter_path())
    drafter, cost = default_drafter(target, batch_sizes)
    return DefaultSetup(target=target, tokenizer=tokenizer, drafter=drafter, cost=cost)
