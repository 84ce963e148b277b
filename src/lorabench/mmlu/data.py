"""MMLU data: the questions (original CSV layout, cais/mmlu parquet, or a hub name), lm-evaluation-harness's
prompt, and the tokenised requests the scorer (scoring.py) runs.

Prompt, byte for byte lm-evaluation-harness's default MMLU template::

    The following are multiple choice questions (with answers) about {subject with spaces}.\\n\\n
    {shot question.strip()}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer: {letter}\\n\\n     (first k dev rows)
    {test question.strip()}\\nA. ...\\nD. {d}\\nAnswer:

Context and continuation (" A".." D") are tokenised together and split where the context's own tokens end (as
lm-eval does), BOS first when the tokenizer config adds one. A context too long for the model drops shots one at
a time, then is left-truncated. No torch here: worker processes that tokenise while the GPU scores import only
this module.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, replace
from pathlib import Path

from ..config import ConfigError
from ..data import looks_like_hub_name
from ..data.tokenizer import Tokenizer

LETTERS = "ABCD"
# Subject -> category, the map of the original evaluation code (hendrycks/test categories).
_CATS = {
    "STEM": "abstract_algebra astronomy college_biology college_chemistry college_computer_science "
            "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
            "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
            "high_school_mathematics high_school_physics high_school_statistics machine_learning",
    "humanities": "formal_logic high_school_european_history high_school_us_history high_school_world_history "
                  "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy "
                  "prehistory professional_law world_religions",
    "social sciences": "econometrics high_school_geography high_school_government_and_politics "
                       "high_school_macroeconomics high_school_microeconomics high_school_psychology "
                       "human_sexuality professional_psychology public_relations security_studies sociology "
                       "us_foreign_policy",
    "other": "anatomy business_ethics clinical_knowledge college_medicine global_facts human_aging management "
             "marketing medical_genetics miscellaneous nutrition professional_accounting professional_medicine "
             "virology",
}
CATEGORY = {s: c for c, subjects in _CATS.items() for s in subjects.split()}


@dataclass
class Question:
    subject: str
    index: int
    """0-based row in the subject's test file."""
    question: str
    choices: list[str]
    gold: int


@dataclass
class Subject:
    name: str
    dev: list[Question]
    test: list[Question]


# -- loading ----------------------------------------------------------------------------------------------------
def load_mmlu(source: str | Path, subjects: list[str] | None = None, limit: int | None = None) -> list[Subject]:
    """Subjects (sorted by name) from the original CSV layout, the cais/mmlu parquet layout, or an HF name."""
    p = Path(source)
    if p.is_dir() and (p / "test").is_dir() and any((p / "test").glob("*_test.csv")):
        found = {f.name[: -len("_test.csv")] for f in (p / "test").glob("*_test.csv")}
        names = _pick(found, subjects, str(p))
        out = []
        for s in names:
            dev_f, test_f = p / "dev" / f"{s}_dev.csv", p / "test" / f"{s}_test.csv"
            if not dev_f.is_file():
                raise ConfigError(f"{dev_f}: missing (each subject needs its dev file for the shots)")
            out.append(Subject(s, read_csv(dev_f, s), read_csv(test_f, s)[:limit]))
        return out
    if p.is_dir():
        return _load_parquet_layout(p, subjects, limit)
    if looks_like_hub_name(source):
        return _load_hub(str(source), subjects, limit)
    if not p.exists():
        raise ConfigError(f"--mmlu {source}: no such folder")
    raise ConfigError(f"--mmlu {source}: not a folder with test/*_test.csv (original layout) or dev/test parquet "
                      "files (cais/mmlu layout)")


def read_csv(path: Path, subject: str) -> list[Question]:
    from ..data.samsum import decode_utf8  # (a ConfigError naming the file and line on bytes that are not UTF-8)

    rows = []
    for i, row in enumerate(csv.reader(io.StringIO(decode_utf8(path.read_bytes(), str(path)), newline=""))):
        if len(row) != 6:
            raise ConfigError(f"{path}: row {i + 1} has {len(row)} fields; expected 6 (question,A,B,C,D,answer)")
        if row[5].strip() not in LETTERS:
            raise ConfigError(f"{path}: row {i + 1} answer {row[5]!r} is not one of A, B, C, D")
        rows.append(Question(subject, i, row[0], row[1:5], LETTERS.index(row[5].strip())))
    if not rows:
        raise ConfigError(f"{path}: no rows")
    return rows


def _pick(found: set[str], subjects: list[str] | None, where: str) -> list[str]:
    if not subjects:
        return sorted(found)
    unknown = [s for s in subjects if s not in found]
    if unknown:
        raise ConfigError(f"--subjects: {', '.join(unknown)} not in {where} (available: {', '.join(sorted(found))})")
    return sorted(subjects)


def _rows_to_subjects(rows_by_split: dict[str, list[dict]], subjects, limit, where: str) -> list[Subject]:
    by: dict[str, dict[str, list[Question]]] = {}
    for split, rows in rows_by_split.items():
        counters: dict[str, int] = {}
        for i, r in enumerate(rows):
            try:
                s, q, ch, a = r["subject"], r["question"], list(r["choices"]), int(r["answer"])
            except (KeyError, TypeError, ValueError) as e:
                raise ConfigError(f"{where} [{split}] row {i}: needs question, subject, choices, answer ({e})") from None
            if len(ch) != 4 or not 0 <= a < 4:
                raise ConfigError(f"{where} [{split}] row {i}: needs 4 choices and an answer index 0-3")
            idx = counters.get(s, 0)
            counters[s] = idx + 1
            by.setdefault(s, {"dev": [], "test": []})[split].append(Question(s, idx, q, ch, a))
    names = _pick({s for s, d in by.items() if d["test"]}, subjects, where)
    return [Subject(s, by[s]["dev"], by[s]["test"][:limit]) for s in names]


def _load_parquet_layout(d: Path, subjects, limit) -> list[Subject]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"--mmlu {d}: reading the parquet layout needs pyarrow (pip install pyarrow)") from None
    root = d / "all" if (d / "all").is_dir() else d
    rows = {}
    for split in ("dev", "test"):
        files = sorted(root.glob(f"{split}-*.parquet")) + sorted(root.glob(f"{split}.parquet"))
        if not files:
            raise ConfigError(f"--mmlu {d}: no {split}*.parquet (expected cais/mmlu's all/{split}-*.parquet)")
        rows[split] = [r for f in files for r in pq.read_table(f).to_pylist()]
    return _rows_to_subjects(rows, subjects, limit, str(root))


def _load_hub(name: str, subjects, limit) -> list[Subject]:
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"--mmlu {name}: no such folder; read as a hub dataset name it needs the 'datasets' package "
                          "(and internet); download MMLU and pass its folder") from None
    rows = {split: list(datasets.load_dataset(name, "all", split=split)) for split in ("dev", "test")}
    return _rows_to_subjects(rows, subjects, limit, name)


# -- prompts ----------------------------------------------------------------------------------------------------
def description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def format_question(q: Question, with_answer: bool) -> str:
    text = q.question.strip() + "".join(f"\n{L}. {c}" for L, c in zip(LETTERS, q.choices)) + "\nAnswer:"
    return text + (f" {LETTERS[q.gold]}" if with_answer else "")


def build_context(subject: Subject, q: Question, shots: int) -> str:
    parts = [format_question(s, True) for s in subject.dev[:shots]] + [format_question(q, False)]
    return description(subject.name) + "\n\n".join(parts)


@dataclass
class Request:
    """One question's tokens: each letter's context (the same list for all four unless the tokenizer splits
    context and continuation differently per letter) and each letter's continuation."""

    q: Question
    contexts: list[list[int]]
    conts: list[list[int]]
    shots: int
    truncated: bool = False

    @property
    def context(self) -> list[int]:
        return self.contexts[0]

    @property
    def single_token(self) -> bool:
        """One forward pass of the shared context serves all four letters."""
        return all(c == self.contexts[0] for c in self.contexts) and all(len(c) == 1 for c in self.conts)


def _split_trailing_space(context: str, cont: str) -> tuple[str, str]:
    n = len(context) - len(context.rstrip(" "))
    return (context[:-n], context[-n:] + cont) if n else (context, cont)


def encode_pairs(tok: Tokenizer, contexts: list[str], conts: list[str]) -> list[list[tuple[list[int], list[int]]]]:
    """lm-eval's split, for many contexts and continuations at once: trailing spaces move from context to
    continuation; context and continuation are encoded together and cut where the context's own encoding ends.
    Returns [context][continuation] -> (context ids, continuation ids)."""
    split = [[_split_trailing_space(c, x) for x in conts] for c in contexts]
    unique_ctx = sorted({s[0] for row in split for s in row})
    ctx_ids = dict(zip(unique_ctx, tok.encode_batch(unique_ctx)))
    wholes = tok.encode_batch([c + x for row in split for c, x in row])
    out, k = [], 0
    for row in split:
        pairs = []
        for c, _ in row:
            ci, w = tok.with_bos(ctx_ids[c]), tok.with_bos(wholes[k])
            pairs.append((w[: len(ci)], w[len(ci):]))
            k += 1
        out.append(pairs)
    return out


def make_requests(tok: Tokenizer, items: list[tuple[Subject, Question]], shots: int, max_len: int) -> list[Request]:
    """Tokenised requests for (subject, question) pairs, batched through the tokenizer. A prompt longer than
    ``max_len`` drops shots one at a time; with none left it keeps its last ``max_len`` tokens."""
    out: list[Request | None] = [None] * len(items)
    k_of = [min(shots, len(s.dev)) for s, _ in items]
    pending = list(range(len(items)))
    while pending:
        contexts = [build_context(items[i][0], items[i][1], k_of[i]) for i in pending]
        encoded = encode_pairs(tok, contexts, [" " + L for L in LETTERS])
        still = []
        for j, i in enumerate(pending):
            ctxs, conts = [p[0] for p in encoded[j]], [p[1] for p in encoded[j]]
            longest = max(len(c) + len(x) for c, x in zip(ctxs, conts))
            if all(c == ctxs[0] for c in ctxs):
                ctxs = [ctxs[0]] * len(ctxs)  # one shared list (a quarter of the memory and pickling)
            if longest <= max_len:
                out[i] = Request(items[i][1], ctxs, conts, k_of[i])
            elif k_of[i] > 0:
                k_of[i] -= 1
                still.append(i)
            else:  # zero shots and still too long: keep the last max_len tokens (at least one of the context)
                cut = [min(len(c) - 1, len(c) + len(x) - max_len) for c, x in zip(ctxs, conts)]
                out[i] = Request(items[i][1], [c[k:] for c, k in zip(ctxs, cut)], conts, 0, truncated=True)
        pending = still
    return out


def make_request(tok: Tokenizer, subject: Subject, q: Question, shots: int, max_len: int) -> Request:
    return make_requests(tok, [(subject, q)], shots, max_len)[0]


_WORKER_TOKENIZER: dict = {}


def _subject_requests(tok: Tokenizer, subject: Subject, shots: int, max_len: int) -> list[Request]:
    return make_requests(tok, [(subject, q) for q in subject.test], shots, max_len)


def _tokenise_subject(model_dir: str, subject: Subject, shots: int, max_len: int) -> list[Request]:
    """Worker side of ``subject_requests``: the tokenizer is read once per worker process."""
    if model_dir not in _WORKER_TOKENIZER:
        _WORKER_TOKENIZER[model_dir] = Tokenizer(model_dir)
    return _subject_requests(_WORKER_TOKENIZER[model_dir], subject, shots, max_len)


TOKENIZE_CHUNK = 256
"""Questions per worker task: a large subject (professional_law: 1,534 long prompts) is spread over the workers
instead of holding one of them while the GPU waits for it."""


def subject_requests(model_dir, subjects: list[Subject], shots: int, max_len: int, background: int):
    """Yield each subject's requests in order. ``background``: that many worker processes tokenise while the
    caller scores (the tokenizer holds the GIL, so a thread would not overlap), each task TOKENIZE_CHUNK
    questions of a subject; the first subject is tokenised here. 0: all here."""
    tok = Tokenizer(model_dir)
    if not background or len(subjects) < 2:
        for s in subjects:
            yield _subject_requests(tok, s, shots, max_len)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(int(background), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [[pool.submit(_tokenise_subject, str(model_dir), replace(s, test=s.test[i:i + TOKENIZE_CHUNK]),
                                shots, max_len) for i in range(0, len(s.test), TOKENIZE_CHUNK)]
                   for s in subjects[1:]]
        try:
            yield _subject_requests(tok, subjects[0], shots, max_len)
            for parts in futures:
                yield [r for f in parts for r in f.result()]
        finally:
            for parts in futures:
                for f in parts:
                    f.cancel()
