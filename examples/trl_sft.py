"""TRL's SFTTrainer with the two-pass step: ``with_zsam(SFTTrainer, SFTConfig)`` (DPO alike).

A tiny Llama and a word-level tokenizer built in memory (no download); put your own model, tokenizer
and dataset in their place. pip install trl; run: python examples/trl_sft.py
"""

import sys

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

from zsam_hf import with_zsam

ZSAMSFTTrainer, ZSAMSFTConfig = with_zsam(SFTTrainer, SFTConfig)  # DPOTrainer, DPOConfig alike

WORDS = "the a cat dog sat ran on under mat log red blue big small and is was very".split()


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", "<s>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   bos_token="<s>")  # fmt: skip


def main(output_dir: str = "outputs/sft") -> ZSAMSFTTrainer:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(WORDS) + 4, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         pad_token_id=0, eos_token_id=1, bos_token_id=3))  # fmt: skip
    rows = torch.randint(0, len(WORDS), (32, 6), generator=torch.Generator().manual_seed(0)).tolist()
    dataset = Dataset.from_dict({"text": [" ".join(WORDS[i] for i in row) for row in rows]})
    args = ZSAMSFTConfig(output_dir=output_dir, sam_variant="zsam", sam_rho=0.05, max_steps=6,
                         per_device_train_batch_size=4, learning_rate=3e-3, max_length=16, bf16=False,
                         use_cpu=True, logging_steps=2, report_to="none")  # fmt: skip
    trainer = ZSAMSFTTrainer(model=model, args=args, processing_class=tokenizer(), train_dataset=dataset)
    trainer.train()  # SFT's own loss and metrics (num_tokens, mean_token_accuracy), counted once per batch
    return trainer


if __name__ == "__main__":
    main(*sys.argv[1:])
