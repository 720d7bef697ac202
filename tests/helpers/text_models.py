"""Tiny text models and a word-level tokenizer built in memory (no Hub): T5 and Llama from config."""

from __future__ import annotations

import torch

WORDS = "the a cat dog sat ran on under mat log red blue big small and is was very".split()


def word_tokenizer():
    """A fast tokenizer over WORDS (whitespace split), with pad/eos/unk/bos tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>", "<s>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", bos_token="<s>"
    )


def tiny_t5(seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(WORDS) + 4, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                      dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)  # fmt: skip
    return T5ForConditionalGeneration(config)


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(WORDS) + 4, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=1, bos_token_id=3)  # fmt: skip
    return LlamaForCausalLM(config)


def sentences(n: int, seed: int = 0) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(WORDS), (n, 6), generator=gen)
    return [" ".join(WORDS[i] for i in row) for row in picks.tolist()]
