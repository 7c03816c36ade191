"""A ~100M-parameter Llama from scratch on the synthetic task: the mid-size config of the
memory benchmark (README "Memory levers").

    tr-align bench --memory --config=configs/llama_100m.py --out=bench/memory_100m.json

compiles the train step once per memory lever (no step is run; a few minutes on 2 CPU
cores). Sizes: 12 layers, hidden 768, 12 query / 4 kv heads, SwiGLU 2048, vocabulary
32000 (Llama 2's) with tied embeddings: 100.1M parameters. Sequences are 512 tokens
(446-token prompts + 64-token responses + BOS/SEP), 8 pairs per step. It also trains
(``tr-align train``), slowly on a CPU. Every other key is configs/default.py's.
"""

import importlib.util
import os


def get_config(preset: str | None = None):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py")
    spec = importlib.util.spec_from_file_location("tr_align_default_config", path)
    default = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(default)
    c = default.get_config(preset)
    c.model.update(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        tie_word_embeddings=True,
        max_position_embeddings=512,
    )
    c.data.update(
        num_train=256, num_eval=64, min_prompt_len=440, max_prompt_len=446, response_len=64
    )
    c.train.update(batch_size=8, eval_batch_size=32, steps=100)
    c.optimizer.learning_rate = 3e-4
    return c
