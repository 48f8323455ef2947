"""Other decoder architectures than the embedded pair's: the runner's passes give the logits of the
model's own forward, alone and batched, on whichever path its load-time probes choose (ragged, or
padded where a model's attention cannot run ragged: alibi, soft-capped attention)."""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny import make_tokenizer

from wsd_llms.loading import LoadedModel
from wsd_llms.model_runner import ModelRunner

TOKENIZER = make_tokenizer(200)
SHARED = {"vocab_size": len(TOKENIZER), "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "max_position_embeddings": 512}
GPT_STYLE = {"vocab_size": len(TOKENIZER), "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 512}

# One of each kind of layout that could go wrong: sliding windows, learned positions, partial
# rotary, alibi, soft-capped attention, mixtures of experts, multi-query attention.
ARCHITECTURES = {
    "qwen2-window": ("Qwen2", {**SHARED, "num_hidden_layers": 2, "num_key_value_heads": 2, "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0}),
    "mistral-window": ("Mistral", {**SHARED, "num_hidden_layers": 2, "num_key_value_heads": 2, "sliding_window": 16}),
    "gemma2-softcaps": ("Gemma2", {**SHARED, "num_hidden_layers": 4, "num_key_value_heads": 2, "head_dim": 8, "sliding_window": 16, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0}),
    "stablelm-partial-rotary": ("StableLm", {**SHARED, "num_hidden_layers": 2, "num_key_value_heads": 2, "partial_rotary_factor": 0.25}),
    "gpt2-learned-positions": ("GPT2", GPT_STYLE),
    "falcon-alibi": ("Falcon", {**SHARED, "num_hidden_layers": 2, "alibi": True, "intermediate_size": None}),
    "mixtral-moe": ("Mixtral", {**SHARED, "num_hidden_layers": 2, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 16}),
    "gptbigcode-multi-query": ("GPTBigCode", {**GPT_STYLE, "multi_query": True}),
}


def _model(kind: str, config: dict) -> LoadedModel:
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{kind}Config")(**{k: v for k, v in config.items() if v is not None})
    model_class = getattr(transformers, "GPT2LMHeadModel" if kind == "GPT2" else f"{kind}ForCausalLM")
    model = model_class(cfg)
    torch.nn.init.normal_(model.get_output_embeddings().weight, std=0.5)
    return LoadedModel(
        name=kind, model=model.eval(), tokenizer=TOKENIZER, eos_ids=frozenset(), context_window=512, device=torch.device("cpu"), dtype=torch.float32
    )


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_passes_give_the_model_s_own_logits(name):
    """A prompt fed in pieces and then a token at a time, and three rows in batched passes of
    uneven widths (prefill pieces, scoring passes, decode steps), past a sliding window: every
    logit equals the model's own forward over the whole sequence."""
    loaded = _model(*ARCHITECTURES[name])
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(7, len(TOKENIZER), (n,), generator=generator).tolist() for n in (70, 20, 45)]
    with torch.no_grad():
        reference = [loaded.model(torch.tensor([s])).logits[0].float() for s in sequences]
    runner = ModelRunner(loaded, bound=False)
    for ragged in sorted({runner.ragged, False}):
        runner.ragged = ragged
        alone, worst = runner.new_cache(), 0.0
        for at in range(0, 48, 16):
            got = runner.extend(alone, sequences[0][at : at + 16], keep=16)
            worst = max(worst, float((got - reference[0][at : at + 16]).abs().max()))
        for at in range(48, 54):
            worst = max(worst, float((runner.extend(alone, [sequences[0][at]]) - reference[0][at]).abs().max()))
        caches, fed = [runner.new_cache() for _ in sequences], [0, 0, 0]
        for widths in ([30, 5, 20], [8, 1, 8], [1, 1, 1], [8, 3, 5], [1, 1, 1]):
            ids = [s[n : n + w] for s, n, w in zip(sequences, fed, widths)]
            for row, (got, new) in enumerate(zip(runner.extend_batch(caches, ids, [len(x) for x in ids]), ids)):
                worst = max(worst, float((got - reference[row][fed[row] : fed[row] + len(new)]).abs().max()))
                fed[row] += len(new)
        assert worst < 1e-4, (name, "ragged" if ragged else "padded", worst)
