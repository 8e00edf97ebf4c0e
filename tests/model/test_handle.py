"""A model resolved from a Hugging Face folder without transformers: config.json, tokenizer.json (+ its config and
chat template), safetensors weights; the lean runner over it computes what transformers computes; the fingerprint
is a function of those files (and changes with each of them); the device is read from torch's build file."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from skillkv.model import CHATML_TEMPLATE, FINGERPRINT_VERSION, byte_tokenizer, resolve_model
from skillkv.model import files as model_files


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny Llama as transformers saves it, with skillkv's byte tokenizer as tokenizer.json."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = resolve_model("dummy:tiny", device="cpu").load()
    model.save_pretrained(folder)
    byte_tokenizer().backend_tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                                              "pad_token": "<|endoftext|>"}))
    (folder / "chat_template.jinja").write_text(CHATML_TEMPLATE)
    return folder


def test_lean_runner_over_a_folder_equals_transformers(hf_folder, tmp_path, tiny_skills):
    from transformers import AutoModelForCausalLM

    from skillkv.api import SkillKV
    from skillkv.generate import SamplingParams

    kv = SkillKV(model=str(hf_folder), store=tmp_path / "store", skills=tiny_skills, device="cpu")
    assert kv.engine == "paged"
    ids = kv.builder.layout(kv.pick(["alpha-tool"]), "Which level is the default?").ids
    seq = kv.runner.open(None)
    got = kv.runner.prefill([seq], [ids])[0]
    kv.runner.release(seq)
    ref = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
    with torch.inference_mode():
        want = ref(input_ids=torch.tensor([ids])).logits[0, -1].float()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    p = SamplingParams(max_tokens=8)
    kv.compile(["alpha-tool"])
    full = kv.ask("Which level is the default?", ["alpha-tool"], mode="full", params=p)
    exact = kv.ask("Which level is the default?", ["alpha-tool"], mode="exact", params=p)
    assert exact.output_token_ids == full.output_token_ids and exact.tokens["cached"] > 0


def _fingerprint(folder) -> str:
    return resolve_model(str(folder), device="cpu").fingerprint


@pytest.mark.parametrize("edit", ["config", "tokenizer_config", "chat_template", "tokenizer", "weights"])
def test_the_fingerprint_is_a_function_of_the_files(hf_folder, tmp_path, edit):
    folder = tmp_path / "m"
    shutil.copytree(hf_folder, folder)
    before = _fingerprint(folder)
    assert before == _fingerprint(folder)  # stable
    if edit == "config":
        c = json.loads((folder / "config.json").read_text())
        c["rms_norm_eps"] = 1e-6
        (folder / "config.json").write_text(json.dumps(c))
    elif edit == "tokenizer_config":
        (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    elif edit == "chat_template":
        (folder / "chat_template.jinja").write_text(CHATML_TEMPLATE + " ")
    elif edit == "tokenizer":
        t = json.loads((folder / "tokenizer.json").read_text())
        t["added_tokens"] = t["added_tokens"][:2]
        (folder / "tokenizer.json").write_text(json.dumps(t))
    else:
        from safetensors.torch import load_file, save_file

        w = load_file(folder / "model.safetensors")
        w["model.norm.weight"] = w["model.norm.weight"] + 1
        save_file(w, folder / "model.safetensors", metadata={"format": "pt"})
    assert _fingerprint(folder) != before


def test_fingerprint_version_is_part_of_the_key(hf_folder, monkeypatch):
    before = _fingerprint(hf_folder)
    monkeypatch.setattr("skillkv.model.handle.FINGERPRINT_VERSION", FINGERPRINT_VERSION + 1)
    assert _fingerprint(hf_folder) != before


@pytest.mark.parametrize("builds,want", [({"cuda": "None", "hip": "None", "xpu": "None"}, False),
                                         ({"cuda": "'12.8'", "hip": "None", "xpu": "None"}, True),
                                         ({"cuda": "None", "hip": "'6.2'", "xpu": "None"}, True)])
def test_a_cpu_only_torch_is_recognised_from_its_build_file(tmp_path, monkeypatch, builds, want):
    import importlib.machinery

    pkg = tmp_path / "torch"
    pkg.mkdir()
    (pkg / "version.py").write_text("from typing import Optional\n__version__ = '9.9'\n" +
                                    "".join(f"{k}: Optional[str] = {v}\n" for k, v in builds.items()))
    spec = importlib.machinery.ModuleSpec("torch", None, is_package=True)
    spec.submodule_search_locations = [str(pkg)]
    monkeypatch.setattr(model_files.importlib.util, "find_spec", lambda name: spec if name == "torch" else None)
    assert model_files.torch_build_has_accelerator() is want
