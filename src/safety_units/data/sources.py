"""Sources: read CSV / JSON / JSONL / TXT rows with a field mapping into examples (prompt, optional response).

A *source* is one file plus a field mapping (see `SOURCE_KEYS`). Sources are combined by the datamodule
(safety_units.data.datamodule) or read by evaluation tasks as prompt sets. Row numbers in errors are 1-based data rows (CSV:
the header is line 1, so data row r is line r + 1).
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safety_units.utils.errors import ConfigError, DataError
from safety_units.utils.ranks import RankedLogger

log = RankedLogger(__name__)

# Every key a source may carry; anything else is a typo and an error.
SOURCE_KEYS = {
    "path": "file to read (.csv, .json, .jsonl, .txt)",
    "format": "auto | csv | tsv | json | jsonl | txt (auto: from the suffix; tsv: GLUE style, header line, each row split on its last tab)",
    "records": "for a JSON object: the key holding the list of rows (e.g. 'instructions')",
    "prompt": "field with the user prompt",
    "input": "optional field appended to the prompt after a blank line (Alpaca 'input')",
    "response": "field with the assistant response; null for prompt-only sets",
    "labels": "map the response field's values to text, e.g. {'0': negative, '1': positive} (classification sets)",
    "messages": "field with a list of {role, content} turns ('.' when the row itself is that list)",
    "system": "system prompt to put before the user turn (null: the template's default)",
    "template": "format string for the user turn, e.g. 'AOA, execute my instruction: {prompt}'",
    "strip_inst": "strip Llama-2 [INST] ... [/INST] / <<SYS>> markup from prompts",
    "where": "row filter: {field: value or [values]}",
    "hash_split": "[lo, hi): keep rows whose prompt hashes into this fraction (stable train/eval partition)",
    "limit": "keep at most this many rows (seeded random subset)",
    "weight": "mixing weight when the datamodule sets num_samples",
    "self_distill": "prompt-only source: generate responses once with the model being trained (or data.self_distill.teacher)",
    "on_bad_row": "error (default) | skip: what to do with a malformed row",
    "exclude": "{name: source}: drop rows whose prompt (normalised) is in any of these sources, e.g. eval sets",
    "name": "label used in logs and reports",
}


@dataclass
class Example:
    messages: list[dict]  # [{role, content}], ending with an assistant turn unless prompt-only
    source: str
    row: int  # 1-based data row in the file
    raw_prompt: str | None = None  # the prompt before a source template was applied

    @property
    def prompt(self) -> str:
        """The prompt as in the file (for de-duplication and reports); the user turn may wrap it in a template."""
        if self.raw_prompt is not None:
            return self.raw_prompt
        users = [m["content"] for m in self.messages if m["role"] == "user"]
        return users[-1] if users else ""

    @property
    def response(self) -> str | None:
        return self.messages[-1]["content"] if self.messages and self.messages[-1]["role"] == "assistant" else None


# --------------------------------------------------------------------------- text helpers
_INST = re.compile(r"<<SYS>>.*?<</SYS>>|\[/?INST\]|<s>|</s>", re.DOTALL)


def strip_llama2_markup(text: str) -> str:
    """'[INST] <<SYS>>..<</SYS>> Do X [/INST]' -> 'Do X' (Wei et al.'s safety-short prompts carry this markup)."""
    return _INST.sub(" ", text).strip()


def normalize_prompt(text: str) -> str:
    """Normalised text for de-duplication and hash splits: lower case, alphanumerics, single spaces."""
    return " ".join(re.sub(r"[^0-9a-z]+", " ", strip_llama2_markup(text).lower()).split())


def stable_fraction(text: str) -> float:
    """A deterministic number in [0, 1) from a prompt: the basis of hash splits (stable across caps/orderings)."""
    h = hashlib.sha1(normalize_prompt(text).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


# --------------------------------------------------------------------------- reading files
def subsample(items: list, k: int, key: str) -> list:
    """k items drawn by a generator seeded with `key`, in their original order (the same draw on every run)."""
    rng = random.Random(key)
    return [items[i] for i in sorted(rng.sample(range(len(items)), k))]


def _detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv", ".json", ".jsonl", ".txt"):
        return suffix[1:]
    raise DataError(f"{path}: cannot tell the format from the suffix '{suffix}'; set format: csv|tsv|json|jsonl|txt.")


def read_rows(path: str | Path, fmt: str = "auto", records: str | None = None) -> list[Any]:
    """Rows of a file as python objects (dicts, or lists for conversation files)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {p} does not exist (data lives in ../shared/data, see its SOURCES.md).")
    fmt = _detect_format(p, fmt)
    text = p.read_text(encoding="utf-8")
    if fmt == "csv":
        return list(csv.DictReader(text.splitlines(keepends=True)))
    if fmt == "txt":
        return [{"text": line.strip()} for line in text.splitlines() if line.strip()]
    if fmt == "tsv":  # GLUE: no quoting, and sentences may hold tabs, so the label is after the last tab
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines:
            raise DataError(f"{p}: empty TSV file (a header line is expected).")
        header = lines[0].split("\t")
        rows = []
        for i, line in enumerate(lines[1:], 1):
            parts = line.rsplit("\t", len(header) - 1)
            if len(parts) != len(header):
                raise DataError(f"{p}: row {i} has {len(parts)} tab-separated fields, the header has {len(header)}.")
            rows.append(dict(zip(header, parts)))
        return rows
    if fmt == "jsonl":
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{p}: line {i} is not valid JSON ({e.msg}).") from None
        return rows
    if fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: not valid JSON ({e.msg} at line {e.lineno}).") from None
        if isinstance(data, dict):
            return _rows_from_object(p, data, records)
        if not isinstance(data, list):
            raise DataError(f"{p}: expected a JSON list of rows, got {type(data).__name__}.")
        return data
    raise DataError(f"{p}: unknown format {fmt!r}; use csv, tsv, json, jsonl or txt.")


def _rows_from_object(p: Path, data: dict, records: str | None) -> list[Any]:
    """A JSON object of parallel lists, e.g. {"instructions": [...], "tags": [...]}, becomes rows."""
    if records is None:
        lists = {k: len(v) for k, v in data.items() if isinstance(v, list) and v}
        if not lists or len(set(lists.values())) != 1:
            raise DataError(f"{p}: a JSON object with keys {sorted(data)}; set `records:` to the key holding the rows.")
        records = sorted(lists)[0]
    if records not in data or not isinstance(data[records], list):
        raise DataError(f"{p}: records={records!r} is not a list in this file (keys: {sorted(data)}).")
    main = data[records]
    if main and isinstance(main[0], dict):
        return main
    n = len(main)
    parallel = {k: v for k, v in data.items() if isinstance(v, list) and len(v) == n}
    return [{k: v[i] for k, v in parallel.items()} for i in range(n)]


# --------------------------------------------------------------------------- sources
@dataclass
class Source:
    path: str
    name: str = ""
    format: str = "auto"
    records: str | None = None
    prompt: str = "prompt"
    input: str | None = None
    response: str | None = "response"
    messages: str | None = None
    system: str | None = None
    template: str | None = None
    strip_inst: bool = False
    where: dict | None = None
    hash_split: list | None = None
    limit: int | None = None
    weight: float = 1.0
    self_distill: bool = False
    on_bad_row: str = "error"
    exclude: dict | None = None
    labels: dict | None = None

    @classmethod
    def from_config(cls, cfg, name: str = "") -> "Source":
        from omegaconf import OmegaConf

        d = OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else dict(cfg)
        unknown = sorted(set(d) - set(SOURCE_KEYS))
        if unknown:
            raise ConfigError(
                f"data source '{name}': unknown key(s) {unknown}. Valid keys: "
                + "; ".join(f"{k} ({v})" for k, v in SOURCE_KEYS.items())
            )
        if not d.get("path"):
            raise ConfigError(f"data source '{name}' has no `path`.")
        d.setdefault("name", name or Path(d["path"]).stem)
        src = cls(**d)
        if src.on_bad_row not in ("error", "skip"):
            raise ConfigError(f"data source '{name}': on_bad_row must be 'error' or 'skip', got {src.on_bad_row!r}.")
        if src.hash_split is not None:
            lo, hi = src.hash_split
            if not 0.0 <= lo < hi <= 1.0:
                raise ConfigError(f"data source '{name}': hash_split must be [lo, hi) within [0, 1], got {src.hash_split}.")
        if src.template is not None and "{prompt}" not in src.template:
            raise ConfigError(f"data source '{name}': template must contain {{prompt}}, got {src.template!r}.")
        if src.limit is not None and src.limit < 1:
            raise ConfigError(f"data source '{name}': limit must be a positive number of rows or null.")
        return src

    def load(self, seed: int = 0, require_response: bool | None = None) -> list[Example]:
        """Read, validate, filter, split and cap the rows of this source. Memoised per process on the settings and
        the files' size and mtime: a study reads the same files in every one of its stages."""
        return list(memoised(_LOADED, self._memo_key(seed, require_response),
                             lambda: self._load(seed, require_response)))

    def _memo_key(self, seed: int, require_response: bool | None) -> tuple | None:
        paths = [self.path, *(c.get("path") for c in (self.exclude or {}).values() if isinstance(c, dict))]
        stamps = [file_stamp(p) for p in paths]
        if None in stamps:
            return None  # a missing file: _load raises the error that names it
        settings = json.dumps(asdict(self), sort_keys=True, default=str)
        return settings, seed, require_response, tuple(stamps)

    def _load(self, seed: int, require_response: bool | None) -> list[Example]:
        rows = read_rows(self.path, self.format, self.records)
        need_response = (self.response is not None or self.messages is not None) if require_response is None \
            else require_response
        examples, bad = [], []
        for i, row in enumerate(rows, 1):
            if self.where and not row_matches(row, self.where):
                continue
            try:
                ex = self._example(row, i, need_response and not self.self_distill)
            except DataError as e:
                if self.on_bad_row == "skip":
                    bad.append(i)
                    continue
                raise DataError(f"{self.path}: row {i}: {e}") from None
            if self.hash_split is not None:
                lo, hi = self.hash_split
                if not lo <= stable_fraction(ex.prompt) < hi:
                    continue
            examples.append(ex)
        if bad:
            log.warning("%s: skipped %d malformed row(s) (on_bad_row=skip): rows %s", self.path, len(bad),
                        ", ".join(map(str, bad[:20])) + (" ..." if len(bad) > 20 else ""))
        if self.exclude:
            excluded = self.excluded_prompts(seed)
            kept = [ex for ex in examples if normalize_prompt(ex.prompt) not in excluded]
            log.info("%s: excluded %d row(s) whose prompt is in %s", self.name, len(examples) - len(kept),
                     ", ".join(self.exclude))
            examples = kept
        if not examples:
            raise DataError(f"{self.path}: no rows left for source '{self.name}' after where={self.where} "
                            f"and hash_split={self.hash_split}.")
        if self.limit is not None and len(examples) > self.limit:
            examples = subsample(examples, self.limit, f"{seed}:{self.name}")
        return examples

    def excluded_prompts(self, seed: int = 0) -> set[str]:
        """Normalised prompts of the `exclude` sources (whole files, after their own where / hash_split)."""
        return normalized_prompts(self.exclude, seed, f"data source '{self.name}': exclude")

    def _field(self, row: Any, key: str, required: bool = True) -> str | None:
        if not isinstance(row, dict):
            raise DataError(f"expected an object with field '{key}', got {type(row).__name__}")
        if key not in row:
            if not required:
                return None
            raise DataError(f"missing field '{key}' (fields present: {sorted(row)})")
        value = row[key]
        if value is None and not required:
            return None
        if not isinstance(value, str):
            raise DataError(f"field '{key}' must be a string, got {type(value).__name__}")
        return value

    def _label(self, row: Any) -> str:
        value = row.get(self.response) if isinstance(row, dict) else None
        if value is None or str(value).strip() not in {str(k) for k in self.labels}:
            raise DataError(f"field '{self.response}' is {value!r}, not one of the labels {sorted(map(str, self.labels))}")
        return str({str(k): v for k, v in self.labels.items()}[str(value).strip()])

    def _example(self, row: Any, i: int, need_response: bool) -> Example:
        if self.messages is not None:
            turns = row if self.messages == "." else (row.get(self.messages) if isinstance(row, dict) else None)
            if not isinstance(turns, list) or not turns:
                raise DataError(f"field '{self.messages}' must be a non-empty list of {{role, content}} turns")
            out = []
            for t in turns:
                if not isinstance(t, dict) or not isinstance(t.get("content"), str) or \
                        t.get("role") not in ("system", "user", "assistant"):
                    raise DataError(f"malformed turn {t!r}: need role in system/user/assistant and string content")
                out.append({"role": t["role"], "content": t["content"]})
            if self.system is not None and out[0]["role"] != "system":
                out.insert(0, {"role": "system", "content": self.system})
            if need_response and (out[-1]["role"] != "assistant" or not out[-1]["content"].strip()):
                raise DataError("conversation must end with a non-empty assistant turn")
            return Example(out, self.name, i)
        prompt = self._field(row, self.prompt)
        if self.strip_inst:
            prompt = strip_llama2_markup(prompt)
        if self.input:
            extra = self._field(row, self.input, required=False)
            if extra and extra.strip() and extra.strip().lower() not in ("<noinput>", "noinput", "no input"):
                prompt = f"{prompt.rstrip()}\n\n{extra.strip()}"
        if not prompt.strip():
            raise DataError(f"empty prompt in field '{self.prompt}'")
        msgs = [] if self.system is None else [{"role": "system", "content": self.system}]
        user = self.template.format(prompt=prompt.strip()) if self.template else prompt.strip()
        msgs.append({"role": "user", "content": user})
        if self.response is not None:
            response = self._field(row, self.response, required=need_response) if self.labels is None \
                else self._label(row)
            if response is not None and response.strip():
                msgs.append({"role": "assistant", "content": response.strip()})
            elif need_response:
                raise DataError(f"empty response in field '{self.response}'")
        return Example(msgs, self.name, i, raw_prompt=prompt.strip())


def file_stamp(path) -> tuple | None:
    """(path, size, mtime) of a file, None when it is missing: a memo entry is stale once its files change."""
    try:
        st = Path(path).stat()
    except (OSError, TypeError):
        return None
    return str(path), st.st_size, st.st_mtime_ns


_LOADED: dict[tuple, list[Example]] = {}  # Source.load's memo
_NORMALIZED: dict[tuple, frozenset[str]] = {}  # normalized_prompts' memo, per source


def memoised(store: dict, key: tuple | None, compute):
    """compute(), remembered in `store` under `key` (None: computed, not remembered); at most 64 entries."""
    if key is None:
        return compute()
    if key not in store:
        if len(store) >= 64:
            store.clear()
        store[key] = compute()
    return store[key]


def normalized_prompts(sources: dict | None, seed: int = 0, where: str = "sources") -> set[str]:
    """Normalised prompts of every source config in `sources` ({name: config}), whole files: their own where and
    hash_split apply, no limit, no self-distillation. Errors name `<where>.<name>`. Memoised like Source.load."""
    out: set[str] = set()
    for name, cfg in (sources or {}).items():
        if cfg is None:
            continue
        src = Source.from_config(cfg, name)
        src.limit, src.self_distill = None, False
        try:
            out |= memoised(_NORMALIZED, src._memo_key(seed, False), lambda src=src: frozenset(
                normalize_prompt(ex.prompt) for ex in src.load(seed, require_response=False)))
        except DataError as e:
            raise ConfigError(f"{where}.{name}: {e}") from None
    return out


def row_matches(row: Any, where: dict) -> bool:
    if not isinstance(row, dict):
        return False
    for key, allowed in where.items():
        allowed = allowed if isinstance(allowed, (list, tuple)) else [allowed]
        if row.get(key) not in allowed and str(row.get(key)) not in map(str, allowed):
            return False
    return True
