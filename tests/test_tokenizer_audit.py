"""Tokenizer and chat-template audit: ids must agree, settings are chosen by the recipe."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

from tests.conftest import write_recipe

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(file: Path, **changes) -> None:
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data, indent=2))


def _recipe(tmp_path: Path, llama, first: Path, **extra) -> Path:
    return write_recipe(tmp_path / "r.yml", llama.base, [first, llama.experts[1]], names=["chat", "plain"], **extra)


def test_same_vocabulary_in_another_file_format_is_accepted(llama, tmp_path, run_cli):
    """transformers saves the base's sentencepiece vocabulary as tokenizer.json: the same ids."""
    expert = _copy(llama.experts[0], tmp_path / "x")
    (expert / "tokenizer.model").unlink()
    AutoTokenizer.from_pretrained(llama.base).save_pretrained(expert)
    assert (expert / "tokenizer.json").is_file() and not (expert / "tokenizer.model").exists()
    result = run_cli("validate", _recipe(tmp_path, llama, expert))
    assert result.code == 0, result.err
    assert "warning" not in result.err


def test_an_added_token_the_base_lacks_is_refused_naming_both_files(llama, tmp_path, run_cli):
    expert = _copy(llama.experts[0], tmp_path / "x")
    _edit_json(expert / "tokenizer_config.json",
               added_tokens_decoder={"512": {"content": "<|im_start|>", "special": True}})
    result = run_cli("validate", _recipe(tmp_path, llama, expert))
    assert result.code == 2
    line = result.err.strip()
    assert len(line.splitlines()) == 1 and "experts[0].model" in line and "'<|im_start|>'" in line
    assert str(expert / "tokenizer_config.json") in line and str(llama.base / "tokenizer.model") in line
    assert "other token ids than it was trained on" in line


def test_a_token_with_another_id_is_refused(llama, tmp_path, run_cli):
    expert = _copy(llama.experts[0], tmp_path / "x")
    AutoTokenizer.from_pretrained(llama.base).save_pretrained(expert)
    (expert / "tokenizer.model").unlink()
    data = json.loads((expert / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]  # two ordinary pieces swap ids
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (expert / "tokenizer.json").write_text(json.dumps(data))
    result = run_cli("validate", _recipe(tmp_path, llama, expert))
    assert result.code == 2 and str(expert / "tokenizer.json") in result.err and repr(a) in result.err


def test_another_bos_is_refused(llama, tmp_path, run_cli):
    expert = _copy(llama.experts[0], tmp_path / "x")
    _edit_json(expert / "special_tokens_map.json", bos_token="</s>")
    result = run_cli("validate", _recipe(tmp_path, llama, expert))
    assert result.code == 2 and f"{expert / 'special_tokens_map.json'} sets bos_token '</s>'" in result.err
    assert f"{llama.base / 'special_tokens_map.json'} '<s>'" in result.err


@pytest.fixture
def chat_expert(llama, tmp_path) -> Path:
    """An expert whose tokenizer carries a chat template and eos <|im_end|>-style settings, and whose
    generation config samples."""
    expert = _copy(llama.experts[0], tmp_path / "x")
    _edit_json(expert / "tokenizer_config.json", chat_template=CHATML, eos_token="<unk>")
    _edit_json(expert / "special_tokens_map.json", eos_token="<unk>")
    _edit_json(expert / "generation_config.json", do_sample=True, temperature=0.6, top_p=0.9)
    return expert


def test_differing_settings_are_reported_and_the_base_is_carried_by_default(llama, chat_expert, tmp_path, run_cli):
    recipe = _recipe(tmp_path, llama, chat_expert)
    result = run_cli("validate", recipe)
    assert result.code == 0
    assert "experts[0].model: its chat template, eos token differ from base_model's" in result.err
    assert f"experts[0].model: its generation_config.json differs" in result.err
    assert run_cli(recipe, tmp_path / "out", "-q").code == 0
    out = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert out.chat_template is None and out.eos_token == "</s>"
    assert (tmp_path / "out" / "generation_config.json").read_bytes() == \
        (llama.base / "generation_config.json").read_bytes()


def test_chosen_settings_are_carried_and_the_card_says_so(llama, chat_expert, tmp_path, run_cli):
    recipe = _recipe(tmp_path, llama, chat_expert, chat_template={"from": "chat"}, generation_config={"from": "chat"})
    result = run_cli(recipe, tmp_path / "out", "-q")
    assert result.code == 0 and "differ" not in result.err
    out = AutoTokenizer.from_pretrained(tmp_path / "out")
    reference = AutoTokenizer.from_pretrained(chat_expert)
    messages = [{"role": "user", "content": "2 + 2 ="}]
    assert out.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert out.eos_token == "<unk>"
    assert (tmp_path / "out" / "generation_config.json").read_bytes() == \
        (chat_expert / "generation_config.json").read_bytes()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "chat template and special tokens: expert `chat`'s" in card and "generation config: expert `chat`'s" in card


def test_choosing_an_expert_without_a_tokenizer_is_an_error(llama, tmp_path, run_cli):
    expert = _copy(llama.experts[0], tmp_path / "x")
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        (expert / name).unlink()
    result = run_cli("validate", _recipe(tmp_path, llama, expert, chat_template={"from": "chat"}))
    assert result.code == 2 and "chat_template.from: expert 'chat' carries no tokenizer settings" in result.err


def test_pad_is_never_bos(llama, tmp_path, run_cli):
    """A chosen tokenizer that pads with BOS (as mergekit saves them) is carried with pad unset."""
    expert = _copy(llama.experts[0], tmp_path / "x")
    _edit_json(expert / "tokenizer_config.json", pad_token="<s>")
    _edit_json(expert / "special_tokens_map.json", pad_token="<s>")
    _edit_json(expert / "generation_config.json", pad_token_id=1)
    recipe = _recipe(tmp_path, llama, expert, chat_template={"from": "chat"}, generation_config={"from": "chat"})
    result = run_cli(recipe, tmp_path / "out", "-q")
    assert result.code == 0 and "pad unset" in result.err
    out = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert out.pad_token is None and out.bos_token == "<s>"
    assert "pad_token_id" not in json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert "pad unset" in (tmp_path / "out" / "README.md").read_text()


def test_an_adapters_own_tokenizer_files_are_audited(llama, tmp_path, run_cli):
    from mergekit_mode.toy.adapters import make_adapter

    adapter = make_adapter(llama.base, tmp_path / "lora", seed=1, r=2, lora_alpha=4, target_modules=["gate_proj"])
    shutil.copy(llama.base / "tokenizer_config.json", adapter / "tokenizer_config.json")
    _edit_json(adapter / "tokenizer_config.json",
               added_tokens_decoder={"512": {"content": "<tool>", "special": True}})
    spec = {"base_model": str(llama.base), "experts": [{"adapter": str(adapter)}, {"model": str(llama.experts[1])}]}
    (tmp_path / "r.yml").write_text(yaml.safe_dump(spec))
    result = run_cli("validate", tmp_path / "r.yml")
    assert result.code == 2 and "experts[0].adapter" in result.err and "'<tool>'" in result.err
