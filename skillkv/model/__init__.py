"""The model: resolution, config, tokenizer, chat template, weight files and fingerprint, from files alone.

  handle.py         ModelHandle and resolve_model: spec -> config + tokenizer + fingerprint; weights on demand
  config.py         ModelConfig: config.json seen as the engine needs it (transformers' defaults and derivations)
  tokenizer.py      Tokenizer: tokenizer.json through `tokenizers`, special tokens, the chat template
  chat_template.py  jinja2 rendering exactly as transformers' apply_chat_template(tokenize=False)
  files.py          the default GGUF and its one-time conversion, weight-file hashes, the device, safetensors reads
  presets.py        dummy model shapes

Importing this package imports neither torch nor transformers.
"""

from skillkv.model.config import ModelConfig, layer_windows
from skillkv.model.files import (convert_gguf, default_device, default_dtype_name, default_gguf, file_sha256,
                                 quiet_transformers)
from skillkv.model.handle import FINGERPRINT_VERSION, ModelHandle, _dummy_config, resolve_model, tokenizer_identity
from skillkv.model.presets import DUMMY_PRESETS
from skillkv.model.tokenizer import CHATML_TEMPLATE, Tokenizer, byte_tokenizer

__all__ = ["CHATML_TEMPLATE", "DUMMY_PRESETS", "FINGERPRINT_VERSION", "ModelConfig", "ModelHandle", "Tokenizer",
           "_dummy_config", "byte_tokenizer", "convert_gguf", "default_device", "default_dtype_name", "default_gguf",
           "file_sha256", "layer_windows", "quiet_transformers", "resolve_model", "tokenizer_identity"]
