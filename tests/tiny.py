"""Tiny randomly initialised model pairs built in-process (seconds, no downloads) for unit tests."""

from __future__ import annotations

import string

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
)

from wsd_llms.loading import LoadedModel, eos_ids

CORPUS = [
    "The capital of France is Paris. The quick brown fox jumps over the lazy dog.",
    "Hello there! How are you today? I am fine, thank you. What is two plus two? It is four.",
    "Write a list: apples, bananas, cherries, dates. Here is some code: def f(x): return x * 2",
    "Photosynthesis turns light into chemical energy. Water boils at 100 degrees.",
] * 20

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]


def make_tokenizer(vocab_size: int, chat: bool = True) -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE trained on a few sentences; `vocab_size` changes how text splits.

    Every token is whole characters, so random models still write valid text.
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tok.decoder = decoders.Metaspace(prepend_scheme="never")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=list(string.printable))
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    """Gemma's and Llama's decoding of characters written as byte tokens (<0xF0>...): ids are
    "A" 1, "▁" (space) 2, and byte b at 3 + b."""
    vocab = {"<unk>": 0, "A": 1, "▁": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def _finish(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, name: str, sharpen: float) -> LoadedModel:
    torch.nn.init.normal_(model.get_output_embeddings().weight, std=sharpen)
    model.eval()
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        eos_ids=eos_ids(tokenizer, model.generation_config),
        context_window=model.config.max_position_embeddings,
        device=torch.device("cpu"),
        dtype=torch.float32,
    )


def _shared(tokenizer: PreTrainedTokenizerFast, window: int = 512) -> dict:
    """The config fields every tiny model shares: vocabulary, widths, heads, context, untied head, special ids."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "max_position_embeddings": window,
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def tiny_llama(tokenizer: PreTrainedTokenizerFast, seed: int, name: str = "tiny-llama", sharpen: float = 0.5, window: int = 512) -> LoadedModel:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        **_shared(tokenizer, window),
        num_hidden_layers=2,
        num_key_value_heads=2,
    )
    return _finish(LlamaForCausalLM(cfg), tokenizer, name, sharpen)


def scripted_draft(tokenizer: PreTrainedTokenizerFast, pieces: list[str], start: str = "<|assistant|>") -> LoadedModel:
    """A draft that writes `pieces` (vocabulary entries, each once) after `start`, then EOS: each
    token's embedding is one-hot and the head maps it to the next, so a test can aim at a chosen
    tokenization of the draft's text."""
    loaded = tiny_llama(tokenizer, 0, "scripted-draft")
    model = loaded.model
    chain = [tokenizer.convert_tokens_to_ids(p) for p in [start, *pieces]] + [tokenizer.eos_token_id]
    assert tokenizer.unk_token_id not in chain and len(set(chain[:-1])) == len(chain) - 1, pieces
    with torch.no_grad():
        for layer in model.model.layers:  # no attention or MLP output: each position sees its own token
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embeddings, head = model.model.embed_tokens.weight, model.lm_head.weight
        embeddings.mul_(0.01)
        head.zero_()
        for k, (token, following) in enumerate(zip(chain[:-1], chain[1:])):
            embeddings[token] = 0
            embeddings[token, k] = 1.0
            head[following, k] = 50.0
    return loaded


def tiny_phi3_longrope(tokenizer: PreTrainedTokenizerFast, seed: int, name: str = "tiny-phi3") -> LoadedModel:
    """Phi-3's 128k layout: longrope, whose RoPE frequencies a pass picks by its longest position
    (short up to 64 positions here, long beyond)."""
    torch.manual_seed(seed)
    cfg = Phi3Config(
        **_shared(tokenizer),
        num_hidden_layers=2,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        original_max_position_embeddings=64,
        rope_scaling={"type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0, 3.0, 4.0, 5.0]},
    )
    return _finish(Phi3ForCausalLM(cfg), tokenizer, name, 0.5)


def tiny_gemma3(tokenizer: PreTrainedTokenizerFast, seed: int, name: str = "tiny-gemma3", sharpen: float = 0.5) -> LoadedModel:
    """Gemma 3 layout: sliding-window layers (window 16, so long tests cross it) and soft-capping."""
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        **_shared(tokenizer),
        num_hidden_layers=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=16,
        final_logit_softcapping=30.0,
        pad_token_id=tokenizer.pad_token_id,
    )
    return _finish(Gemma3ForCausalLM(cfg), tokenizer, name, sharpen)


def tiny_deepseek(tokenizer: PreTrainedTokenizerFast, seed: int, name: str = "tiny-deepseek", sharpen: float = 0.5) -> LoadedModel:
    """DeepSeek-V3 layout: latent attention, whose cached keys and values differ in head size."""
    torch.manual_seed(seed)
    cfg = DeepseekV3Config(
        **_shared(tokenizer),
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_key_value_heads=4,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=2,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_rope_head_dim=4,
        qk_nope_head_dim=8,
        v_head_dim=6,
    )
    return _finish(DeepseekV3ForCausalLM(cfg), tokenizer, name, sharpen)


def tiny_granite(tokenizer: PreTrainedTokenizerFast, seed: int, name: str = "tiny-granite", sharpen: float = 0.5) -> LoadedModel:
    """Granite layout: its forward divides the logits by `logits_scaling`, beyond a plain head."""
    torch.manual_seed(seed)
    cfg = GraniteConfig(**_shared(tokenizer), num_hidden_layers=2, num_key_value_heads=2, logits_scaling=4.0)
    return _finish(GraniteForCausalLM(cfg), tokenizer, name, sharpen)
