"""An Ollama ``Modelfile`` next to each GGUF: its chat template as a Go template, and its stop tokens.

A Jinja chat template cannot be translated in general, so the template's pieces are learned by rendering it
(with the model's own tokenizer) on conversations with marked contents: the text before and after each
role's message, the default system block it adds when none is given, and the generation prompt. The Go
template built from these pieces is accepted only if rendering the pieces reproduces the Jinja template's
text exactly on test conversations; otherwise the export refuses Ollama and says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from finetune_studio.engine.export.errors import ExportError

_S, _U1, _A1, _U2 = "\x02S\x03", "\x02U1\x03", "\x02A1\x03", "\x02U2\x03"
# Conversations the Go template must render exactly as the chat template does before a Modelfile is written.
PROBE_CONVERSATIONS = (
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
    [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "Bye"},
    ],
    [
        {"role": "system", "content": "Answer in JSON."},
        {"role": "user", "content": "What is 2 plus 2?"},
        {"role": "assistant", "content": '{"answer": 4}'},
        {"role": "user", "content": "And 3 plus 3?"},
        {"role": "assistant", "content": '{"answer": 6}'},
        {"role": "user", "content": "Thanks.\nBye."},
    ],
)


@dataclass(frozen=True)
class Pieces:
    default_system: str  # written before the first message when it is not a system message
    prefix: dict  # role -> text before the content
    suffix: dict  # role -> text after the content
    generation: str  # the assistant's opening, after the last message

    def render(self, messages: list[dict]) -> str:
        """What the Go template renders (the same rules, in Python), with a generation prompt."""
        out = self.default_system if messages and messages[0]["role"] != "system" else ""
        for m in messages:
            out += self.prefix[m["role"]] + m["content"] + self.suffix[m["role"]]
        return out + self.generation


def _split(text: str, marks: list[str]) -> list[str]:
    pieces = []
    for mark in marks:
        head, found, text = text.partition(mark)
        if not found:
            raise ValueError(f"the chat template dropped a message ({mark!r})")
        pieces.append(head)
    return pieces + [text]


def learn_pieces(tokenizer) -> Pieces:
    def render(msgs, gen):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    sys_, u1, a1, u2 = (
        {"role": "system", "content": _S},
        {"role": "user", "content": _U1},
        {"role": "assistant", "content": _A1},
        {"role": "user", "content": _U2},
    )
    try:
        p = _split(render([sys_, u1, a1, u2], True), [_S, _U1, _A1, _U2])
        s_user = _split(render([sys_, u1], False), [_S, _U1])[-1]
        s_asst = _split(render([sys_, u1, a1], False), [_S, _U1, _A1])[-1]
        head_nosys = _split(render([u1], True), [_U1])[0]
    except Exception as exc:  # a template that refuses system messages, or drops content
        raise ExportError(f"cannot write this chat template as an Ollama template: {exc}") from None
    if not (p[3].startswith(s_asst) and p[2].startswith(s_user) and p[4].startswith(s_user)):
        raise ExportError("cannot write this chat template as an Ollama template: its turns are not regular")
    p_user = p[3][len(s_asst) :]
    if not (p[1].endswith(p_user) and head_nosys.endswith(p_user)):
        raise ExportError("cannot write this chat template as an Ollama template: the user turn is not regular")
    return Pieces(
        default_system=head_nosys[: len(head_nosys) - len(p_user)],
        prefix={"system": p[0], "user": p_user, "assistant": p[2][len(s_user) :]},
        suffix={"system": p[1][: len(p[1]) - len(p_user)], "user": s_user, "assistant": s_asst},
        generation=p[4][len(s_user) :],
    )


def go_template(pieces: Pieces) -> str:
    """The Ollama (Go ``text/template``) form of ``pieces``; literal text is kept byte for byte."""
    out = ""
    if pieces.default_system:
        out += f'{{{{ if ne (index .Messages 0).Role "system" }}}}{pieces.default_system}{{{{ end }}}}'
    out += "{{ range .Messages }}"
    for i, role in enumerate(("system", "user", "assistant")):
        out += f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}'
        out += f"{pieces.prefix[role]}{{{{ .Content }}}}{pieces.suffix[role]}"
    out += "{{ end }}{{ end }}" + pieces.generation
    return out


def stop_tokens(tokenizer) -> list[str]:
    from finetune_studio.engine.export.build import end_of_turn_id

    ids = [end_of_turn_id(tokenizer), tokenizer.eos_token_id]
    out = []
    for i in ids:
        if i is not None:
            text = tokenizer.convert_ids_to_tokens(i)
            if text not in out:
                out.append(text)
    return out


def write_modelfile(tokenizer, gguf_path: Path, path: Path) -> Path:
    """Write the Modelfile at ``path`` for the GGUF file ``gguf_path`` (in the same folder)."""
    if not tokenizer.chat_template:
        raise ExportError("the model has no chat template, so Ollama would not know how to prompt it")
    pieces = learn_pieces(tokenizer)
    for conv in PROBE_CONVERSATIONS:
        if pieces.render(conv) != tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True):
            raise ExportError("cannot write this chat template as an Ollama template: it does not render the same")
    template = go_template(pieces)
    stops = stop_tokens(tokenizer)
    if '"""' in template or "{{" in "".join(pieces.prefix.values()) + "".join(pieces.suffix.values()):
        raise ExportError("cannot write this chat template as an Ollama template: it contains Go template syntax")
    if any('"' in s for s in stops):
        raise ExportError(f"a stop token contains a quote, which a Modelfile cannot hold: {stops}")
    lines = [
        f"# Written by Finetune Studio for {gguf_path.name}. Create the model with: ollama create NAME -f {path.name}",
        "# then talk to it with: ollama run NAME",
        f"FROM ./{gguf_path.name}",
        f'TEMPLATE """{template}"""',
    ]
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
