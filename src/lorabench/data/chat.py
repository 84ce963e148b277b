"""Chat records: ``messages`` (role/content) and ShareGPT ``conversations`` (from/value), rendered with the
model's own chat template, and the character spans of the assistant turns (``--loss-on response``).

The template is the tokenizer's: ``chat_template`` in tokenizer_config.json (a string, or a list of named
templates, "default" taken) or a ``chat_template.jinja`` file beside it. It is rendered as transformers'
``apply_chat_template(messages, tokenize=False)`` renders it: Jinja2's immutable sandbox with ``trim_blocks`` and
``lstrip_blocks``, the ``loopcontrols`` extension, ``raise_exception``, ``strftime_now`` and a ``tojson`` filter,
and the tokenizer's special tokens (``bos_token``, ``eos_token``, ...) as variables; ``{% generation %}`` blocks
render their body. The rendered text carries the template's own special tokens, so no BOS or EOS is added to it.

An assistant turn's span is found by rendering the conversation turn by turn: the text up to the turn with
``add_generation_prompt=True`` ends where the turn's own text begins, and the text with the turn ends where it
ends (its end-of-turn tokens included, so the model learns to stop). A template that does not render each prefix
as the start of the whole conversation (one that changes earlier turns by what follows) is refused for
``--loss-on response``, naming the record.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from ..config import ConfigError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool"}


class ChatTemplate:
    """A model's chat template, compiled once."""

    def __init__(self, source: str, template: str, special_tokens: dict[str, str]):
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class Generation(jinja2.ext.Extension):  # {% generation %}...{% endgeneration %}: the body, as it is
            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return jinja2.nodes.Scope(body, lineno=lineno)

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[Generation, jinja2.ext.loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False, ensure_ascii=False: \
            json.dumps(x, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.source, self.special_tokens = source, special_tokens
        try:
            self._template = env.from_string(template)
        except jinja2.exceptions.TemplateError as e:
            raise ConfigError(f"{source}: the chat template does not compile ({e})") from None

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "ChatTemplate | None":
        """The template of a model folder's tokenizer, or None where it has none."""
        d = Path(model_dir)
        cfg_path = d / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        template, source = cfg.get("chat_template"), cfg_path
        if isinstance(template, list):  # [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template is None and (d / "chat_template.jinja").is_file():
            template, source = (d / "chat_template.jinja").read_text(encoding="utf-8"), d / "chat_template.jinja"
        if not isinstance(template, str):
            return None
        special = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"):
            tok = cfg.get(key)
            if isinstance(tok, dict):
                tok = tok.get("content")
            if isinstance(tok, str):
                special[key] = tok
        return cls(str(source), template, special)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        import jinja2

        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens)
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"the chat template ({self.source}) refused it: {e}") from None

    def render_with_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]] | None]:
        """(the conversation's text, the [start, end) character spans of its assistant turns); spans None when the
        template does not render turn by turn (see the module's docstring)."""
        text = self.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[:i + 1])
            if not (text.startswith(through) and through.startswith(before) and len(through) > len(before)):
                return text, None
            spans.append((len(before), len(through)))
        return text, spans


def chat_messages(rec: dict, column: str, where: str) -> list[dict]:
    """The record's turns as [{"role", "content"}]: ``messages`` as they are, ShareGPT ``conversations``
    (from/value) mapped to roles; a ValueError naming the turn and what is wrong."""
    turns = rec[column]
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: {column!r} must be a non-empty list of turns, got {type(turns).__name__}")
    out = []
    for j, t in enumerate(turns):
        at = f"{where}: {column}[{j}]"
        if not isinstance(t, dict):
            raise ValueError(f"{at}: expected an object, got {type(t).__name__}")
        if column == "conversations":
            role, content = t.get("from"), t.get("value")
            if role not in SHAREGPT_ROLES:
                raise ValueError(f"{at}: 'from' is {role!r}; ShareGPT turns are from "
                                 f"{', '.join(sorted(SHAREGPT_ROLES))}")
            role = SHAREGPT_ROLES[role]
        else:
            role, content = t.get("role"), t.get("content")
            if not isinstance(role, str):
                raise ValueError(f"{at}: needs a string 'role' (columns present: {', '.join(map(str, t))})")
        if not isinstance(content, str):
            raise ValueError(f"{at}: {'value' if column == 'conversations' else 'content'} must be a string, got "
                             f"{type(content).__name__}")
        out.append({"role": role, "content": content})
    return out
