"""Record formats: which columns a dataset has, and the text each record becomes.

``--format`` names one, or it is detected from the first record's columns:

- ``samsum`` (``dialogue``, ``summary``): FlagPerf's prompt, ``Summarize this dialog:\\n{dialogue}\\n---\\nSummary:\\n``
  then the summary (FlagPerf's training/benchmarks/llama2_7b_finetune/pytorch);
- ``alpaca`` (``instruction``, optional ``input``, ``output``): the Stanford Alpaca prompt (its repository's
  ``PROMPT_DICT``: "Below is an instruction that describes a task[, paired with an input that provides further
  context]. Write a response that appropriately completes the request." then ``### Instruction:``, ``### Input:``,
  ``### Response:`` sections) then the output;
- ``text`` (``text``): the text as it is;
- ``--prompt-template "...{column}..."``: any other columns, each ``{column}`` replaced by the record's value.

- ``chat`` (``messages``: role/content turns) and ``sharegpt`` (``conversations``: from/value turns): the
  conversation rendered with the model's chat template (chat.py), its assistant turns the response.

Every record's columns are checked (present, strings; chat turns each with a role and a string) with the file and
row named.
"""
from __future__ import annotations

import string

FORMATS = ("samsum", "alpaca", "text", "chat", "sharegpt")
CHAT_COLUMNS = {"chat": "messages", "sharegpt": "conversations"}

PROMPT = "Summarize this dialog:\n{dialogue}\n---\nSummary:\n"
"""FlagPerf's samsum prompt (its dataset code); the summary and EOS follow."""
ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                   "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def template_columns(template: str) -> list[str]:
    """The ``{column}`` names of a --prompt-template, in order."""
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise ValueError(f"--prompt-template {template!r}: {e} (write literal braces as {{{{ and }}}})") from None


def detect(columns, where: str) -> str:
    """The format of a record with these columns; a ValueError naming them and the formats otherwise."""
    cols = set(columns)
    if {"dialogue", "summary"} <= cols:
        return "samsum"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if "text" in cols:
        return "text"
    if "messages" in cols:
        return "chat"
    if "conversations" in cols:
        return "sharegpt"
    raise ValueError(f"{where}: columns {', '.join(sorted(map(str, cols)))} match no format (samsum: dialogue, "
                     "summary; alpaca: instruction, input, output; text: text); give --prompt-template "
                     "\"...{column}...\" or --format")


def needed(fmt: str | None, template: str | None) -> tuple[list[str], list[str]]:
    """(required columns, optional columns) of a format or template."""
    if template is not None:
        return template_columns(template), []
    return {"samsum": (["dialogue", "summary"], []), "alpaca": (["instruction", "output"], ["input"]),
            "text": (["text"], []), "chat": (["messages"], []), "sharegpt": (["conversations"], [])}[fmt]


def render_parts(rec: dict, fmt: str | None, template: str | None) -> tuple[str, str | None]:
    """(prompt, response) of a checked record: the text it trains on is prompt + response, and ``--loss-on
    response`` trains on the response alone. samsum: FlagPerf's prompt, the summary; alpaca: the Alpaca prompt, the
    output; a --prompt-template: everything before its last ``{column}``, then that column's value and the rest;
    text: the text, with no response (None)."""
    if template is not None:
        f = string.Formatter()
        pieces = list(f.parse(template))
        text = template.format_map({k: rec[k] for k in template_columns(template)})
        fields = [i for i, (_, name, _, _) in enumerate(pieces) if name is not None]
        if not fields:
            return text, None
        head = "".join(lit + ("" if name is None else f.format_field(f.convert_field(rec[name], conv), spec or ""))
                       for lit, name, spec, conv in pieces[:fields[-1]]) + pieces[fields[-1]][0]
        return head, text[len(head):]
    if fmt == "samsum":
        return PROMPT.format(dialogue=rec["dialogue"]), rec["summary"]
    if fmt == "alpaca":
        prompt = ALPACA_WITH_INPUT if rec.get("input") else ALPACA_NO_INPUT
        return prompt.format(instruction=rec["instruction"], input=rec.get("input", "")), rec["output"]
    return rec["text"], None


def render(rec: dict, fmt: str | None, template: str | None) -> str:
    """The training text of a checked record."""
    prompt, response = render_parts(rec, fmt, template)
    return prompt + (response or "")
