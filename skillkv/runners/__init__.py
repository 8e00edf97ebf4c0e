"""The engines behind SkillKV, behind one contract (runners/base.py): `hf` (transformers) and `paged` (the lean
Llama-family runner over the KV pool)."""
