"""What the benchmarks that train small models share."""

from __future__ import annotations

import math

import torch


def warmup_cosine(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over the first 5 % of `steps`, then cosine decay to zero: short
    runs from random weights diverge without the warm-up, and the decay lets them end
    on a settled loss."""
    warm = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def small_llama(vocab: int, *, hidden: int, mlp: int, layers: int, seed: int):
    """A randomly initialised Llama (4 heads, no grouped keys, 64 positions, token 0
    pads, token 1 begins and ends) seeded with `seed`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def train_lm(model, tokenizer, texts, steps: int, *, lr: float, weight_decay: float) -> float:
    """`steps` AdamW steps (betas 0.9, 0.98; gradients clipped at norm 1; the schedule
    above) of next-token loss on every non-padding token of `texts()`, a fresh batch of
    strings per step. Returns the last step's loss; the model is left in eval mode."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    sched = warmup_cosine(opt, steps)
    model.train()
    loss = torch.zeros(())
    for step in range(steps):
        enc = tokenizer(texts(), padding=True, return_tensors="pt")
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"  step {step:5d}  loss {loss.item():.3f}", flush=True)
    model.eval()
    return loss.item()
