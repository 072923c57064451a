"""An Ollama Modelfile for an exported GGUF (`export-gguf --ollama`).

The Modelfile (docs.ollama.com/modelfile) is `INSTRUCTION value` lines: `FROM` the GGUF (a path
relative to the Modelfile), `TEMPLATE` in Go's text/template syntax, `PARAMETER stop` per stop
sequence and the sampling `PARAMETER`s. Multi-line values go in triple quotes; Ollama's parser
has no escapes, so a value that holds `\"\"\"` cannot be written.

The chat template is the model's Jinja template, converted for the common case: a template that
renders every message as fixed text around its content (ChatML, Llama 3, Mistral, Zephyr, Gemma
and the like), optionally with a system block before the first user message or a default one
when there is none. The conversion is found by rendering the Jinja template (transformers'
`apply_chat_template`) with marker messages, then checked by rendering probe conversations both
ways; a template that does anything else is not converted, and the caller says so in one line
instead of writing a wrong template (Ollama then falls back to a built-in template that matches
the GGUF's own chat template, if it knows one). Parameters follow transformers' generation
semantics: without `do_sample: true` generation is greedy (temperature 0).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mergekit_mode import __version__
from mergekit_mode.inputs import read_json
from mergekit_mode.tokenizer_audit import read_tokenizer

_MARK = "mkmode7"  # marker contents: text no template adds or changes
SYSTEM, USER, ASSISTANT = "system", "user", "assistant"


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _common_suffix(a: str, b: str) -> str:
    return _common_prefix(a[::-1], b[::-1])[::-1]


@dataclass(frozen=True)
class Wrappers:
    """Fixed text around each message: what a Go template of per-role branches renders."""

    bos: str  # the BOS text the Jinja template starts with, left to the runtime (it adds BOS)
    default_system: str  # rendered when there is no system message
    system: Optional[tuple[str, str]]  # (before, after) the system message; None: the template takes none
    user: tuple[str, str]
    assistant: tuple[str, str]
    generation: str  # after the last user message: the assistant's header

    def render(self, messages: list[dict]) -> str:
        """What Ollama renders from `go_template()`: its .System is the system messages joined by a
        blank line (template.go's collate), .Messages all of them."""
        system = "\n\n".join(m["content"] for m in messages if m["role"] == SYSTEM)
        out = [self.bos]
        if system and self.system:
            out += [self.system[0], system, self.system[1]]
        else:
            out.append(self.default_system)
        wrap = {USER: self.user, ASSISTANT: self.assistant}
        for m in messages:
            if m["role"] in wrap:
                out += [wrap[m["role"]][0], m["content"], wrap[m["role"]][1]]
        return "".join(out + [self.generation])

    def go_template(self) -> str:
        def text(s: str) -> str:
            return s.replace("{{", '{{ "{{" }}')

        head = text(self.default_system)
        if self.system:
            head = (f"{{{{ if .System }}}}{text(self.system[0])}{{{{ .System }}}}{text(self.system[1])}"
                    + (f"{{{{ else }}}}{head}" if head else "") + "{{ end }}")
        return (f"{head}{{{{ range .Messages }}}}"
                f'{{{{ if eq .Role "user" }}}}{text(self.user[0])}{{{{ .Content }}}}{text(self.user[1])}'
                f'{{{{ else if eq .Role "assistant" }}}}{text(self.assistant[0])}{{{{ .Content }}}}'
                f"{text(self.assistant[1])}{{{{ end }}}}{{{{ end }}}}{text(self.generation)}")


class NotConvertible(Exception):
    """The Jinja template is not fixed text around each message; the message says why."""


def _messages(*roles: str) -> list[dict]:
    counts: dict[str, int] = {}
    out = []
    for role in roles:
        counts[role] = counts.get(role, 0) + 1
        out.append({"role": role, "content": f"{_MARK}{role}{counts[role]}{_MARK}"})
    return out


def _split(rendered: str, messages: list[dict]) -> list[str]:
    """The text between the messages' contents: len(messages) + 1 pieces."""
    pieces, rest = [], rendered
    for m in messages:
        if rest.count(m["content"]) != 1:
            raise NotConvertible(f"the {m['role']} message's text does not appear exactly once as written")
        before, rest = rest.split(m["content"])
        pieces.append(before)
    return pieces + [rest]


def derive(render, bos_token: Optional[str], strip_bos: bool) -> Wrappers:
    """The wrappers of a chat template, from renders of marker conversations; `render(messages)` is
    the Jinja template with add_generation_prompt, raising on conversations it refuses."""
    def attempt(*roles: str) -> tuple[list[dict], Optional[str]]:
        messages = _messages(*roles)
        try:
            return messages, render(messages)
        except Exception:  # the template refused this conversation (raise_exception) or failed
            return messages, None

    one, r_one = attempt(USER)
    three, r_three = attempt(USER, ASSISTANT, USER)
    if r_one is None or r_three is None:
        raise NotConvertible("it does not render a user / assistant / user conversation")
    first, gen_after = _split(r_one, one)
    head, x1, x2, x3 = _split(r_three, three)
    if head != first or x3 != gen_after:
        raise NotConvertible("the first or last user message is wrapped differently in longer conversations")
    bos = bos_token if strip_bos and bos_token and first.startswith(bos_token) else ""
    first = first[len(bos):]
    pre_user = _common_suffix(first, x2)
    post_user = _common_prefix(x1, gen_after)
    wrappers = Wrappers(
        bos=bos, default_system=first[:len(first) - len(pre_user)], system=None,
        user=(pre_user, post_user), assistant=(x1[len(post_user):], x2[:len(x2) - len(pre_user)]),
        generation=gen_after[len(post_user):])
    with_system, r_system = attempt(SYSTEM, USER, ASSISTANT, USER)
    if r_system is not None:
        lead, before_user, *_ = _split(r_system, with_system)
        user_at = r_system.index(with_system[1]["content"])
        block = lead[len(bos):]
        if not lead.startswith(bos) or not before_user.endswith(pre_user) or \
                r_system[user_at:] != r_three[r_three.index(three[0]["content"]):]:
            raise NotConvertible("the system message is not a block of its own before the first user message")
        wrappers = Wrappers(bos, wrappers.default_system, (block, before_user[:len(before_user) - len(pre_user)]),
                            wrappers.user, wrappers.assistant, wrappers.generation)
    probes = [(USER,), (USER, ASSISTANT, USER, ASSISTANT, USER)]
    if wrappers.system:
        probes += [(SYSTEM, USER), (SYSTEM, USER, ASSISTANT, USER, ASSISTANT, USER)]
    for roles in probes:
        messages, expected = attempt(*roles)
        if expected is None or wrappers.render(messages) != expected:
            raise NotConvertible(f"a {len(roles)}-message conversation renders otherwise than per-message wrappers")
    return wrappers


def _printable(text: str) -> bool:
    """Ollama's parser keeps only printable characters besides newlines and tabs (strconv.IsPrint)."""
    return all(c in "\n\t\r" or c.isprintable() for c in text)


def _quote(value: str) -> str:
    if '"' not in value and "\n" not in value and value == value.strip():
        return f'"{value}"'
    return f'"""{value}"""'


def _number(value: float) -> str:
    return json.dumps(value)


def _parameters(generation: dict) -> list[tuple[str, str]]:
    """transformers' generation settings as Ollama parameters."""
    params: list[tuple[str, str]] = []
    if generation.get("do_sample"):
        params += [("temperature", _number(generation.get("temperature", 1.0))),
                   ("top_p", _number(generation.get("top_p", 1.0))),
                   ("top_k", _number(int(generation.get("top_k", 50))))]
        if generation.get("min_p") is not None:
            params.append(("min_p", _number(generation["min_p"])))
    else:
        params.append(("temperature", "0"))
    penalty = generation.get("repetition_penalty")
    if penalty is not None and penalty != 1.0:
        params += [("repeat_penalty", _number(penalty)), ("repeat_last_n", "-1")]  # transformers: the whole text
    if generation.get("max_new_tokens") is not None:
        params.append(("num_predict", _number(int(generation["max_new_tokens"]))))
    return params


def _stops(model_dir: Path, generation: dict, wrappers: Optional[Wrappers]) -> list[str]:
    """EOS tokens of the generation config and the tokenizer, and the token that ends an assistant turn."""
    tokenizer = read_tokenizer(model_dir, "MODEL")
    if tokenizer is None:
        return []
    by_id = {i: t for t, i in tokenizer.vocab.items()}
    eos = generation.get("eos_token_id")
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    stops = [by_id[i] for i in ids if i in by_id]
    if tokenizer.special["eos_token"]:
        stops.append(tokenizer.special["eos_token"])
    if wrappers is not None and wrappers.assistant[1].strip() in tokenizer.vocab:
        stops.append(wrappers.assistant[1].strip())
    return list(dict.fromkeys(s for s in stops if s))


def make_modelfile(model_dir: Path, gguf: Path, modelfile_path: Path) -> tuple[str, Optional[str]]:
    """The Modelfile's text, and a one-line note when the chat template was not converted."""
    from transformers import AutoTokenizer

    generation = read_json(model_dir / "generation_config.json") if (model_dir / "generation_config.json").is_file() \
        else {}
    wrappers, note = None, None
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        note = "the model has no chat template: no TEMPLATE written (Ollama's default sends the prompt as it is)"
    else:
        config = model_dir / "tokenizer_config.json"
        add_bos = (read_json(config) if config.is_file() else {}).get("add_bos_token", True) is not False

        def render(messages: list[dict]) -> str:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

        try:
            wrappers = derive(render, tokenizer.bos_token, add_bos)
            if '"""' in wrappers.go_template() or not _printable(wrappers.go_template()):
                raise NotConvertible("it holds text a Modelfile cannot quote")
        except NotConvertible as e:
            wrappers = None
            note = (f"the chat template was not converted to Ollama's Go template ({e}): no TEMPLATE written; "
                    "write one by hand (Ollama otherwise picks a built-in template like the GGUF's, if any)")
    lines = [f"# Written by mergekit-mode {__version__} for {gguf.name}: ollama create NAME -f {modelfile_path.name}",
             f"FROM ./{gguf.name}"]
    if wrappers is not None:
        lines.append(f'TEMPLATE """{wrappers.go_template()}"""')
        if wrappers.system is None:
            lines.append("# The chat template takes no system message: Ollama's SYSTEM is not used.")
    elif note:
        lines.append(f"# {note}")
    lines += [f"PARAMETER stop {_quote(stop)}" for stop in _stops(model_dir, generation, wrappers)
              if _printable(stop) and '"""' not in stop]
    if not generation.get("do_sample"):
        lines.append("# generation_config.json does not sample (no do_sample: true): greedy, as in transformers")
    lines += [f"PARAMETER {key} {value}" for key, value in _parameters(generation)]
    return "\n".join(lines) + "\n", note


def write_modelfile(path: Path, text: str) -> None:
    """Write the Modelfile whole, or not at all."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_text(text, encoding="utf-8")
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
