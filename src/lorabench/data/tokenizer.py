"""The model's tokenizer, from its HF folder.

``tokenizer.json`` is read with the ``tokenizers`` library directly (fast, no transformers import); a folder with
only a sentencepiece ``tokenizer.model`` goes through ``transformers.AutoTokenizer``. Special tokens are never
inserted by ``encode``: callers add BOS (when the tokenizer config says so) and EOS themselves, explicitly.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..config import ConfigError


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        d = Path(model_dir)
        cfg_path = d / "tokenizer_config.json"
        try:
            tcfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{cfg_path}: not valid JSON ({e})") from None
        if not isinstance(tcfg, dict):
            raise ConfigError(f"{cfg_path}: expected a JSON object, got {type(tcfg).__name__}")
        self.add_bos = bool(tcfg.get("add_bos_token", True))
        h = hashlib.sha256()
        for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
            if (d / name).is_file():
                h.update(name.encode() + (d / name).read_bytes())
        self.fingerprint = h.hexdigest()[:16]
        if (d / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as _Fast

            try:
                self._tok = _Fast.from_file(str(d / "tokenizer.json"))
            except Exception as e:  # noqa: BLE001  (tokenizers raises its own Exception type on a bad file)
                raise ConfigError(f"{d / 'tokenizer.json'}: not a readable tokenizer "
                                  f"({str(e).splitlines()[0][:120]})") from None
            self._hf = None
            bos, eos = _token_str(tcfg.get("bos_token", "<s>")), _token_str(tcfg.get("eos_token", "</s>"))
            self.bos_id, self.eos_id = self._tok.token_to_id(bos), self._tok.token_to_id(eos)
            self.vocab_size = self._tok.get_vocab_size()
        elif (d / "tokenizer.model").is_file():
            try:
                from transformers import AutoTokenizer
            except ImportError:
                raise ConfigError(f"{d}: only tokenizer.model is present; reading it needs transformers and "
                                  "sentencepiece (pip install transformers sentencepiece)") from None
            self._hf = AutoTokenizer.from_pretrained(str(d))
            self._tok = None
            self.bos_id, self.eos_id = self._hf.bos_token_id, self._hf.eos_token_id
            self.vocab_size = len(self._hf)
        else:
            raise ConfigError(f"{d}: no tokenizer.json or tokenizer.model; the model folder needs its tokenizer")
        if self.eos_id is None or (self.add_bos and self.bos_id is None):
            raise ConfigError(f"{d}: tokenizer has no {'EOS' if self.eos_id is None else 'BOS'} token")

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with no special tokens added."""
        if self._tok is not None:
            return self._tok.encode(text, add_special_tokens=False).ids
        return self._hf.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._tok is not None:
            return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]
        return [self._hf.encode(t, add_special_tokens=False) for t in texts]

    def encode_batch_offsets(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """Each text's token ids and each token's [start, end) characters (no special tokens added)."""
        if self._tok is not None:
            return [(e.ids, list(e.offsets)) for e in self._tok.encode_batch(texts, add_special_tokens=False)]
        if not getattr(self._hf, "is_fast", False):
            raise ConfigError("this tokenizer (tokenizer.model only, no fast tokenizer) gives no character offsets, "
                              "which --loss-on response needs; add the model's tokenizer.json")
        enc = self._hf(texts, add_special_tokens=False, return_offsets_mapping=True)
        return [(ids, [tuple(o) for o in offs]) for ids, offs in zip(enc["input_ids"], enc["offset_mapping"])]

    def decode(self, ids: list[int]) -> str:
        if self._tok is not None:
            return self._tok.decode(ids)
        return self._hf.decode(ids)

    def with_bos(self, ids: list[int]) -> list[int]:
        return [self.bos_id] + ids if self.add_bos else ids


def _token_str(tok) -> str:
    """tokenizer_config.json stores special tokens as a string or as an AddedToken dict."""
    return tok["content"] if isinstance(tok, dict) else tok
