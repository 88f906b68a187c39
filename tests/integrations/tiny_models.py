"""Tiny local models for the vLLM integration tests: a word-level tokenizer trained with
`tokenizers`, and random 2-layer Llamas whose next-token law is a noisy permutation of the last
token (so prompt lookup and a draft model get real acceptances, and the law is still exact:
the tests compute it with transformers from the saved weights)."""

from pathlib import Path

import torch

VOCAB_WORDS = 60  # plus 4 special tokens: a 64-token vocabulary
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


def build_tokenizer(folder: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i:02d}" for i in range(VOCAB_WORDS)]
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, vocab_size=len(SPECIAL_TOKENS) + VOCAB_WORDS)
    tokenizer.train_from_iterator([" ".join(words)] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.save_pretrained(folder)
    return fast


def build_permutation_llama(folder: Path, *, seed: int, sharpness: float = 0.6, context_weight: float = 0.02):
    """A 2-layer Llama (hidden 128, 2 heads of 64) whose logits favour perm(last token).

    Embeddings are random directions of norm sqrt(hidden); the LM head maps the direction of token x to a peak at
    perm(x), so after the final RMSNorm the logit gap is about sharpness * sqrt(hidden). Attention
    and MLP outputs are small random matrices (context_weight), so the law also depends a little
    on the earlier tokens, as a real model's does.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder)
    vocab = len(tokenizer)
    hidden = 128
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         torch_dtype="float32")
    g = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * context_weight)
        directions = torch.nn.functional.normalize(torch.randn(vocab, hidden, generator=g), dim=-1)
        model.model.embed_tokens.weight.copy_(directions * hidden ** 0.5)
        permutation = torch.randperm(vocab, generator=g)
        head = torch.randn(vocab, hidden, generator=g) * 0.02
        head[permutation] += sharpness * directions  # logits[perm(x)] peak when the state points at x
        model.lm_head.weight.copy_(head)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    torch.save(permutation, folder / "permutation.pt")
    return folder


def cycle_prompt_ids(folder: Path, start: int, length: int) -> list:
    """Token ids start, perm(start), perm(perm(start)), ...: a prompt prompt lookup can continue."""
    permutation = torch.load(Path(folder) / "permutation.pt")
    ids = [start]
    for _ in range(length - 1):
        ids.append(int(permutation[ids[-1]]))
    return ids


@torch.no_grad()
def next_token_laws(folder: Path, prefixes: list, temperature: float) -> torch.Tensor:
    """Exact next-token law [len(prefixes), V] (float64) of the saved model, from transformers."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    laws = []
    for prefix in prefixes:
        logits = model(torch.tensor([prefix])).logits[0, -1].double()
        laws.append(torch.softmax(logits / temperature, dim=-1))
    return torch.stack(laws)
