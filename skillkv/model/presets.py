"""Dummy models: random weights (seeded) of known shapes, so every path runs anywhere without model files.

  tiny            a 2-layer Llama of width 64 (most tests)
  gemma3-tiny     Gemma 3's architecture at toy size (sliding-window layers; the hf runner)
  smollm2-135m    the default model's shape
  llama-3.1-8b    the 8B shape (llama3 RoPE scaling), for the GPU benchmarks
  qwen2.5-7b      Qwen2's shape (qkv biases)
"""

from __future__ import annotations

DUMMY_PRESETS: dict[str, dict] = {
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
                 max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
    # Gemma 3's architecture at toy size: sliding-window and global layers with their own RoPE bases, a window of
    # 32 tokens (prompts exceed it), embeddings scaled by sqrt(hidden), q/k norms, one kv head
    "gemma3-tiny": dict(model_type="gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=16, vocab_size=512,
                        max_position_embeddings=4096, sliding_window=32, query_pre_attn_scalar=16,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                        rope_parameters={"sliding_attention": dict(rope_type="default", rope_theta=10000.0),
                                         "full_attention": dict(rope_type="default", rope_theta=1000000.0)},
                        rms_norm_eps=1e-6, tie_word_embeddings=True),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                         max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=8192),
                         rope_theta=500000.0),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=False),
}
