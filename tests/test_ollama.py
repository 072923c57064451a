"""`export-gguf --ollama`: the Modelfile's syntax, its Go template against the Jinja chat template,
stop tokens and parameters. No Ollama binary: the Modelfile is read with a port of Ollama's parser
(parser/parser.go) and its template run by a small interpreter of Go's text/template for the
actions it uses, with Ollama's values (.System: the system messages joined; .Messages: all)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from mergekit_mode.ollama import make_modelfile
from tests.conftest import write_recipe

# --- Ollama's Modelfile parser (parser.go ParseFile), ported ---------------------------------------

_COMMANDS = {"from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter",
             "message", "requires"}


def _unquote(s: str) -> tuple[str, bool]:
    if s.startswith('"""'):
        return (s[3:-3], True) if len(s) >= 6 and s.endswith('"""') else ("", False)
    if s.startswith('"'):
        return (s[1:-1], True) if len(s) >= 2 and s.endswith('"') else ("", False)
    return s, True


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(command, value) pairs, as Ollama's ParseFile reads them; raises on what it rejects."""
    commands: list[tuple[str, str]] = []
    state, buf, name = "nil", "", ""
    for r in text + "\n":
        newline, space = r in "\r\n", r in " \t"
        if state == "nil":
            if r == "#":
                state = "comment"
            elif not (newline or space):
                state, buf = "name", r
        elif state == "comment":
            if newline:
                state = "nil"
        elif state == "name":
            if r.isalpha():
                buf += r
            elif space:
                if buf.lower() not in _COMMANDS:
                    raise ValueError(f"invalid command {buf!r}")
                name = buf.lower()
                state, buf = ("parameter" if name == "parameter" else "value"), ""
            else:
                raise ValueError("invalid command")
        elif state == "parameter":
            if r.isalnum() or r == "_":
                buf += r
            elif space:
                name, state, buf = buf, "value", ""
            else:
                raise ValueError("unexpected end of parameter name")
        elif state == "value":
            if newline or space:
                value, ok = _unquote(buf.strip())
                if not ok or space:
                    buf += r
                    continue
                commands.append(("model" if name == "from" else name, value))
                state, buf = "nil", ""
            elif r.isprintable():
                buf += r
    if state not in ("nil", "comment"):
        raise ValueError("unexpected end of file")
    if not any(c == "model" for c, _ in commands):
        raise ValueError("no FROM line")
    return commands


# --- Go text/template, for the actions the converter writes ----------------------------------------

def _parse_go(tokens: list[str], i: int = 0) -> tuple[list, int, str]:
    nodes: list = []
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if not token.startswith("{{"):
            nodes.append(("text", token))
            continue
        action = token[2:-2].strip()
        if action == "end" or action == "else" or action.startswith("else if "):
            return nodes, i, action
        if action.startswith('"'):
            nodes.append(("text", json.loads(action)))
        elif action.startswith("."):
            nodes.append(("field", action[1:]))
        elif action.startswith("if ") or action.startswith("range "):
            kind, cond = action.split(" ", 1)
            body, i, stop = _parse_go(tokens, i)
            other: list = []
            while stop != "end":
                if stop == "else":
                    other, i, stop = _parse_go(tokens, i)
                else:  # else if COND: a nested if that shares this end
                    then, i, stop_inner = _parse_go(tokens, i)
                    branch = ("if", stop[len("else if "):], then, [])
                    other, stop = [branch], stop_inner
                    if stop_inner == "else":
                        rest, i, stop = _parse_go(tokens, i)
                        branch[3].extend(rest)
            nodes.append((kind, cond, body, other))
        else:
            raise ValueError(f"action {action!r} is not interpreted here")
    return nodes, i, ""


def _truth(cond: str, dot: dict) -> bool:
    m = re.fullmatch(r'eq \.(\w+) "(\w+)"', cond)
    return dot[m.group(1)] == m.group(2) if m else bool(dot[cond.lstrip(".")])


def _exec(nodes: list, dot: dict) -> str:
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "field":
            out.append(dot[node[1]])
        elif node[0] == "if":
            out.append(_exec(node[2] if _truth(node[1], dot) else node[3], dot))
        elif node[0] == "range":
            out += [_exec(node[2], item) for item in dot[node[1].lstrip(".")]]
    return "".join(out)


def go_render(template: str, messages: list[dict]) -> str:
    tokens = [t for t in re.split(r"(\{\{.*?\}\})", template, flags=re.S) if t]
    nodes, _, _ = _parse_go(tokens)
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return _exec(nodes, {"System": system, "Messages": [{"Role": m["role"], "Content": m["content"]}
                                                          for m in messages]})


# --- the chat templates --------------------------------------------------------------------------

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant"
          "<|end_header_id|>\n\n{% endif %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}")
ZEPHYR = ("{% for message in messages %}{% if message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + "
          "eos_token }}{% elif message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + eos_token }}"
          "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n'  + message['content'] + eos_token }}{% endif %}"
          "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}{% endfor %}")
DEFAULT_SYSTEM = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                  "{% endif %}" + CHATML)
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
          "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
          "{% endif %}{% for message in loop_messages %}{% if loop.index0 == 0 and system_message != false %}"
          "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}"
          "{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
          "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
          "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
NUMBERED = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
            "Turn {{ loop.index }} {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "A {{ x }}"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye\nnow"}],
]


def _model(base: Path, folder: Path, template: str | None, **generation) -> Path:
    shutil.copytree(base, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    gen = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**gen, **generation}))
    return folder


def _commands(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for command, value in parse_modelfile(text):
        out.setdefault(command, []).append(value)
    return out


@pytest.mark.parametrize("template", [CHATML, LLAMA3, MISTRAL, ZEPHYR, DEFAULT_SYSTEM],
                         ids=["chatml", "llama3", "mistral", "zephyr", "default-system"])
def test_common_templates_become_go_templates_that_render_the_same(llama, tmp_path, template):
    folder = _model(llama.base, tmp_path / "m", template)
    text, note = make_modelfile(folder, tmp_path / "m-f16.gguf", tmp_path / "m-f16.Modelfile")
    assert note is None
    commands = _commands(text)
    assert commands["model"] == ["./m-f16.gguf"]
    go = commands["template"][0]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for messages in CONVERSATIONS:
        try:
            expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # the template refuses it (Mistral: no system message)
            assert "takes no system message" in text
            continue
        if template == LLAMA3:
            expected = expected.removeprefix("<s>")  # the runtime adds BOS (add_bos_token)
        if template == MISTRAL:
            expected = expected.removeprefix("<s>")
        assert go_render(go, messages) == expected


@pytest.mark.parametrize("template, reason", [
    (LLAMA2, "the system message is not a block of its own"),
    (NUMBERED, "renders otherwise than per-message wrappers"),
])
def test_a_template_that_cannot_be_converted_is_said_in_one_line_and_not_written(llama, tmp_path, template, reason):
    folder = _model(llama.base, tmp_path / "m", template)
    text, note = make_modelfile(folder, tmp_path / "m.gguf", tmp_path / "m.Modelfile")
    assert note is not None and reason in note and "\n" not in note
    assert "template" not in _commands(text)


def test_stops_and_sampling_parameters_come_from_the_generation_config(llama, tmp_path):
    folder = _model(llama.base, tmp_path / "m", CHATML, do_sample=True, temperature=0.6, top_p=0.9,
                    repetition_penalty=1.1, max_new_tokens=256, eos_token_id=[2, 0])
    commands = _commands(make_modelfile(folder, tmp_path / "m.gguf", tmp_path / "m.Modelfile")[0])
    assert commands["stop"] == ["</s>", "<unk>"]  # the ids 2 and 0 as the tokenizer spells them
    assert commands["temperature"] == ["0.6"] and commands["top_p"] == ["0.9"] and commands["top_k"] == ["50"]
    assert commands["repeat_penalty"] == ["1.1"] and commands["repeat_last_n"] == ["-1"]
    assert commands["num_predict"] == ["256"]


def test_greedy_generation_config_gives_temperature_0(llama, tmp_path):
    folder = _model(llama.base, tmp_path / "m", None)
    text, note = make_modelfile(folder, tmp_path / "m.gguf", tmp_path / "m.Modelfile")
    commands = _commands(text)
    assert commands["temperature"] == ["0"] and "template" not in commands and "no chat template" in note


def test_export_gguf_ollama_writes_the_modelfile_beside_the_gguf(llama, tmp_path, run_cli, monkeypatch):
    """llama.cpp's converter stands in as a script that writes its --outfile (the conversion itself is
    checked in tests/runtime)."""
    converter = tmp_path / "convert_hf_to_gguf.py"
    converter.write_text("import sys\nopen(sys.argv[sys.argv.index('--outfile') + 1], 'wb').write(b'GGUF')\n")
    monkeypatch.setenv("LLAMA_CPP_CONVERTER", str(converter))
    recipe = write_recipe(tmp_path / "r.yml", llama.base, llama.experts[:2], chat_template={"from": "chat"},
                          names=["chat", "other"])
    chat = _model(llama.experts[0], tmp_path / "chat", CHATML)
    recipe.write_text(recipe.read_text().replace(str(llama.experts[0]), str(chat)))
    assert run_cli(recipe, tmp_path / "moe", "-q").code == 0
    folder = tmp_path / "moe"
    result = run_cli("export-gguf", folder, "--ollama")
    assert result.code == 0, result.err
    assert (tmp_path / "moe-f16.gguf").read_bytes() == b"GGUF"
    commands = _commands((tmp_path / "moe-f16.Modelfile").read_text())
    assert commands["model"] == ["./moe-f16.gguf"] and "template" in commands
    again = run_cli("export-gguf", folder, "--ollama", "--outfile", tmp_path / "other.gguf")
    assert again.code == 0 and (tmp_path / "other.Modelfile").is_file()
    assert run_cli("export-gguf", folder, "--ollama", "--outfile", tmp_path / "x.gguf").code == 0
    (tmp_path / "x.gguf").unlink()
    refused = run_cli("export-gguf", folder, "--ollama", "--outfile", tmp_path / "x.gguf")
    assert refused.code == 2 and "x.Modelfile exists" in refused.err
