"""Models covrl can run without a model hub.

- :func:`char_tokenizer` / :func:`tiny_causal_lm`: a character-level tokenizer with a
  ChatML chat template and a tiny randomly initialised Llama, built from a config in
  memory. Tests use them: they build in milliseconds and need no download.
- :func:`save_tiny_model`: writes both to a directory that ``from_pretrained`` (and so
  every covrl service) can load by path.
"""

from __future__ import annotations

import os
import string

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]


def char_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` over printable ASCII plus ChatML tokens.

    ``<|im_end|>`` is the EOS token and ``<pad>`` the padding token; ids 0..3 are the
    special tokens, then one id per character.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.padding_side = "left"
    return fast


def tiny_causal_lm(
    vocab_size: int | None = None,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_position_embeddings: int = 512,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """A tiny randomly initialised ``LlamaForCausalLM`` (deterministic for a given seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if vocab_size is None:
        vocab_size = len(char_tokenizer())
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=0,
        eos_token_id=SPECIAL_TOKENS.index("<|im_end|>"),
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.to(dtype)


def save_tiny_model(path: str | os.PathLike, *, seed: int = 0, **kwargs) -> str:
    """Write a tiny model and its tokenizer to ``path`` (HF format, safetensors); return the path."""
    path = os.fspath(path)
    tok = char_tokenizer()
    model = tiny_causal_lm(len(tok), seed=seed, **kwargs)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path
