"""A datastore of the target's own text for retrieval drafting (REST, He et al. 2024; the global
suffix tree of Arctic Inference's suffix decoding): where a request's own text has no earlier
copy of its last tokens, the same n-gram in text the target wrote for other prompts often goes
on the same way ("Here is a", "I hope this helps").

``TokenDatastore`` holds token sequences (ids >= 0, one -1 between sequences). For each n in
[min_ngram, max_ngram] it indexes every n-gram that a token follows, and keeps one continuation
per distinct n-gram: the most frequent next token after it, from that token's most recent
occurrence on (up to K tokens, never across a sequence end). ``continuation`` finds the longest
suffix of a sequence that the store holds: a sorted-key search per n, no scan.

The index is built on load with a few sorts (~0.1 s for 300k tokens). Keys pack the n token ids
into one int64 (``id_0 + V id_1 + V^2 id_2 + ...`` for ids in [0, V): exact while V^n < 2^64;
wrapping past it, where two n-grams may share a key: a worse draft, never a wrong output, since
drafts are only proposals).
"""

from array import array
from bisect import bisect_left
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

SEPARATOR = -1
TOKENS_KEY = "tokens"


class TokenDatastore:
    def __init__(self, tokens: torch.Tensor, vocab_size: int, min_ngram: int = 2, max_ngram: int = 4,
                 max_continuation: int = 16, notes: Optional[dict] = None):
        if tokens.dim() != 1:
            raise ValueError(f"TokenDatastore: tokens must be 1-D, got shape {tuple(tokens.shape)}")
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"TokenDatastore: need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        if max_continuation < 1 or vocab_size < 1:
            raise ValueError(f"TokenDatastore: need max_continuation >= 1 and vocab_size >= 1, got "
                             f"{max_continuation}, {vocab_size}")
        tokens = tokens.to("cpu", torch.int64)
        if tokens.numel() and (int(tokens.min()) < SEPARATOR or int(tokens.max()) >= vocab_size):
            raise ValueError(f"TokenDatastore: token ids must be in [0, {vocab_size}) (or {SEPARATOR} between "
                             f"sequences)")
        self.tokens = tokens
        self.vocab_size = int(vocab_size)
        self.min_ngram, self.max_ngram = int(min_ngram), int(max_ngram)
        self.max_continuation = int(max_continuation)
        self.notes = dict(notes or {})
        # Per n: (sorted distinct keys [G], the position where each key's continuation starts [G]),
        # as plain int64 arrays: ``continuation`` bisects them in C, where a torch.searchsorted
        # call would cost ~10 us of dispatch per n-gram size, in every round, for every request.
        self._index = {n: tuple(array("q", column.tolist()) for column in self._build(n))
                       for n in range(self.min_ngram, self.max_ngram + 1)}
        self._tokens_list = self.tokens.tolist()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_sequences(cls, sequences: Sequence[Sequence[int]], vocab_size: int, **kwargs) -> "TokenDatastore":
        flat: List[int] = []
        for sequence in sequences:
            flat.extend(int(t) for t in sequence)
            flat.append(SEPARATOR)
        return cls(torch.tensor(flat, dtype=torch.int64), vocab_size, **kwargs)

    def _keys(self, windows: torch.Tensor) -> torch.Tensor:
        """int64 keys of the rows of ``windows`` [N, n] (wrapping multiplication: see the module)."""
        key = torch.zeros(windows.shape[0], dtype=torch.int64)
        for j in range(windows.shape[1] - 1, -1, -1):
            key = key * self.vocab_size + windows[:, j]
        return key

    def _build(self, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokens
        if tokens.numel() < n + 1:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
        windows = tokens.unfold(0, n + 1, 1)  # [L - n, n + 1]: an n-gram and the token after it
        valid = (windows >= 0).all(1)
        starts = torch.arange(windows.shape[0])[valid]
        windows = windows[valid]
        keys, following = self._keys(windows[:, :n]), windows[:, n]
        # Sort by (key, next token, position): stable sorts, least significant first.
        order = torch.sort(following, stable=True).indices
        order = order[torch.sort(keys[order], stable=True).indices]
        keys, following, starts = keys[order], following[order], starts[order]
        # Runs of one (key, next token): their size and their most recent occurrence.
        new_run = torch.ones_like(keys, dtype=torch.bool)
        new_run[1:] = (keys[1:] != keys[:-1]) | (following[1:] != following[:-1])
        run_id = new_run.cumsum(0) - 1
        runs = int(run_id[-1]) + 1 if run_id.numel() else 0
        run_size = torch.bincount(run_id, minlength=runs)
        run_last = torch.full((runs,), -1, dtype=torch.int64).scatter_reduce(0, run_id, starts, "amax")
        run_key = keys[new_run]
        # Per key, the largest run (ties: the most recent): sort runs by (key, size, last position).
        score = run_size * (tokens.numel() + 1) + run_last
        order = torch.sort(score, stable=True).indices
        order = order[torch.sort(run_key[order], stable=True).indices]
        run_key, run_last = run_key[order], run_last[order]
        last_of_key = torch.ones_like(run_key, dtype=torch.bool)
        last_of_key[:-1] = run_key[1:] != run_key[:-1]
        return run_key[last_of_key].contiguous(), (run_last[last_of_key] + n).contiguous()

    def check_vocabulary(self, vocab_size: int, what: str) -> None:
        """Refuses a store built for another vocabulary (its drafts would be another tokenizer's ids)."""
        if int(vocab_size) != self.vocab_size:
            raise ValueError(f"the datastore holds ids of a {self.vocab_size}-token vocabulary; {what} has "
                             f"{int(vocab_size)}: build one for it (dspark build-datastore --model ...)")

    # ------------------------------------------------------------------ lookup
    def continuation(self, sequence: Sequence[int], num_tokens: int) -> Tuple[List[int], int]:
        """(up to ``num_tokens`` tokens that follow the longest suffix of ``sequence`` the store
        holds, that suffix's length n), or ([], 0)."""
        length = len(sequence)
        for n in range(min(self.max_ngram, length), self.min_ngram - 1, -1):
            keys, begins = self._index[n]
            suffix = sequence[length - n:]
            if not keys or not all(0 <= int(t) < self.vocab_size for t in suffix):
                continue  # an id outside the vocabulary would alias another n-gram's key
            key = 0
            for token in reversed(suffix):
                key = key * self.vocab_size + int(token)
            key = (key + 2 ** 63) % 2 ** 64 - 2 ** 63  # the int64 wrap of _keys
            at = bisect_left(keys, key)
            if at < len(keys) and keys[at] == key:
                begin = begins[at]
                following = self._tokens_list[begin:begin + min(num_tokens, self.max_continuation)]
                if SEPARATOR in following:
                    following = following[:following.index(SEPARATOR)]
                return following, n
        return [], 0

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> None:
        """``path`` (safetensors): the tokens (int32) and the settings as metadata."""
        import json

        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"vocab_size": str(self.vocab_size), "min_ngram": str(self.min_ngram),
                "max_ngram": str(self.max_ngram), "max_continuation": str(self.max_continuation),
                "notes": json.dumps(self.notes)}
        save_file({TOKENS_KEY: self.tokens.to(torch.int32).contiguous()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path) -> "TokenDatastore":
        import json

        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if TOKENS_KEY not in f.keys():
                raise ValueError(f"{path}: not a TokenDatastore file (no {TOKENS_KEY!r} tensor)")
            tokens = f.get_tensor(TOKENS_KEY)
        try:
            return cls(tokens, int(meta["vocab_size"]), min_ngram=int(meta["min_ngram"]),
                       max_ngram=int(meta["max_ngram"]), max_continuation=int(meta["max_continuation"]),
                       notes=json.loads(meta.get("notes", "{}")))
        except KeyError as missing:
            raise ValueError(f"{path}: not a TokenDatastore file (no {missing} in its metadata)") from None


#: A text shorter than the overlap window marks overlap whole from this many tokens on (shorter
#: ones, "Thanks!", are common enough to appear anywhere).
SHORTEST_WHOLE_TEXT = 8


def token_windows(sequences: Sequence[Sequence[int]], width: int) -> Dict[int, set]:
    """{length: runs of ids} marking overlap with ``sequences``: every run of ``width``
    consecutive ids, and a sequence shorter than that whole (from ``SHORTEST_WHOLE_TEXT`` ids)."""
    windows: Dict[int, set] = {}
    for sequence in sequences:
        size = min(width, len(sequence))
        if size < min(width, SHORTEST_WHOLE_TEXT):
            continue
        runs = windows.setdefault(size, set())
        runs.update(tuple(sequence[i:i + size]) for i in range(len(sequence) - size + 1))
    return windows


def shares_a_window(sequence: Sequence[int], windows: Dict[int, set]) -> bool:
    """Whether ``sequence`` holds any run of ``windows`` (``token_windows``)."""
    return any(tuple(sequence[i:i + size]) in runs for size, runs in windows.items()
               for i in range(len(sequence) - size + 1))


def build_datastore(target, prompts: Sequence[torch.Tensor], *, vocab_size: int, keep: Optional[Sequence[bool]] = None,
                    max_new_tokens: int = 128, batch_size: int = 16, eos_token_id=None, log=print,
                    notes: Optional[dict] = None, **kwargs) -> TokenDatastore:
    """The target's greedy answers to the ``prompts`` that ``keep`` keeps (all by default), as a
    ``TokenDatastore``. Every prompt is answered (``batch_size`` at a time, up to
    ``max_new_tokens`` tokens), so that which ones are kept never changes a batch: the kept
    answers are the same whatever is dropped. Kept prompts must be held out from any evaluation
    and from the prompts that calibrate the lookup."""
    from dspark_ext.drafters.lookup import NgramDrafter
    from dspark_ext.generate import generate

    keep = [True] * len(prompts) if keep is None else list(keep)
    if len(keep) != len(prompts):
        raise ValueError(f"build_datastore: keep has {len(keep)} entries for {len(prompts)} prompts")
    answers: List[List[int]] = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start:start + batch_size])
        # Greedy: the answers are the target's whatever drafts; prompt lookup only makes it faster.
        result = generate(target, NgramDrafter(num_draft=4), batch, max_new_tokens, temperature=0.0,
                          eos_token_id=eos_token_id)
        answers += [[int(t) for t in tokens] for tokens in result.tokens]
        log(f"datastore: prompts {start + len(batch)}/{len(prompts)}, {sum(map(len, answers))} answer tokens")
    kept = [answer for answer, wanted in zip(answers, keep) if wanted]
    info = {"prompts": len(kept), "answered": len(prompts), "max_new_tokens": max_new_tokens,
            "batch_size": batch_size, "answer_tokens": sum(map(len, kept))}
    info.update(notes or {})
    return TokenDatastore.from_sequences(kept, vocab_size, notes=info, **kwargs)
