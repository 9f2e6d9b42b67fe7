"""Calibration and evaluation data from a real corpus; the two DVC stages of `dvc.yaml` call this module.

    python -m llmpress.data fetch   --params params.yaml --out data/raw        (stage `corpus`)
    python -m llmpress.data prepare --params params.yaml --raw data/raw --out data   (stage `prepare`)

The default corpus is the Lee news corpus (300 Australian news articles, one per line) shipped inside the gensim
wheel on PyPI: we download the wheel (never install or import it) and read the one text file out of the zip.

`prepare` is deterministic: a seeded shuffle holds out `eval_fraction` of the documents as the evaluation text
(kept in corpus order, joined by blank lines), and `calibration_samples` passages are drawn, with the same seed,
from the remaining documents, each long enough to fill `seq_len` tokens of any common tokenizer. The sets are plain
text, so one data version serves any model; `calibration_windows` tokenizes a set for one model at run time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

from llmpress.config import DataParams, load_params
from llmpress.errors import LlmpressError

GENSIM_VERSION = "4.4.0"
GENSIM_MEMBER = "gensim/test/test_data/lee_background.cor"
RAW_NAME = "corpus.txt"
# Characters per passage per requested token: English BPE averages ~4-5 characters a token; 8 leaves headroom.
CHARS_PER_TOKEN = 8
MIN_DOCUMENTS = 4


def cache_dir() -> Path:
    return Path(os.environ.get("LLMPRESS_CACHE", Path.home() / ".cache" / "llmpress"))


def fetch_corpus(corpus: str, out_dir: Path) -> Path:
    """Put the corpus, one document per line, at out_dir/corpus.txt."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / RAW_NAME
    if corpus == "gensim-lee":
        text = _gensim_lee_text()
    else:
        path = Path(corpus)
        if not path.is_file():
            raise LlmpressError(f"data.corpus: {corpus!r} is neither 'gensim-lee' nor an existing .txt/.jsonl file")
        text = "\n".join(read_documents(path)) + "\n"
    _write_atomic(out, text)
    return out


def _gensim_lee_text() -> str:
    wheels = cache_dir() / "wheels"
    found = sorted(wheels.glob(f"gensim-{GENSIM_VERSION}-*.whl"))
    if not found:
        wheels.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               f"gensim=={GENSIM_VERSION}", "-d", str(wheels)]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheels.glob(f"gensim-{GENSIM_VERSION}-*.whl"))
        if result.returncode != 0 or not found:
            raise LlmpressError(
                f"could not download the gensim {GENSIM_VERSION} wheel from PyPI: {result.stderr[-500:]}"
            )
    with zipfile.ZipFile(found[0]) as archive:
        return archive.read(GENSIM_MEMBER).decode("utf-8")


def read_documents(path: Path) -> list[str]:
    """Documents of a .txt/.cor file (one per line) or a .jsonl file ({"text": "..."} per line); blanks dropped.
    A "text" that is not a string, or a line that is not text (`_check_text`), is refused naming the line."""
    docs = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                raise LlmpressError(f"{path}:{number}: not UTF-8 text (byte {exc.start} of the line)") from None
            if path.suffix == ".jsonl" and line.strip():
                try:
                    line = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise LlmpressError(f"{path}:{number}: expected a JSON object with a 'text' field") from None
                if not isinstance(line, str):
                    raise LlmpressError(f"{path}:{number}: 'text' must be a string, got {_json_kind(line)}")
            _check_text(line, f"{path}:{number}")
            if line.strip():
                docs.append(" ".join(line.split()))
    return docs


# C0 and C1 control characters other than tab, newline and carriage return
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
MAX_CONTROL_SHARE = 0.01


def _check_text(text: str, where: str) -> None:
    """Refuse a document that is not text: any NUL character, or more than 1 % control characters."""
    if "\x00" in text:
        raise LlmpressError(f"{where}: NUL character (character {text.index(chr(0)) + 1}); not a text corpus")
    count = len(CONTROL.findall(text))
    if count > MAX_CONTROL_SHARE * len(text):
        raise LlmpressError(
            f"{where}: {count} of {len(text)} characters are control characters (at most 1 % are allowed, besides "
            "tab and line breaks); not a text corpus"
        )


def _json_kind(value: object) -> str:
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return {int: "a number", float: "a number", list: "an array", dict: "an object"}.get(type(value), repr(value))


def split_documents(docs: list[str], params: DataParams) -> tuple[list[str], list[str]]:
    """(calibration documents, evaluation documents); evaluation keeps corpus order."""
    if len(docs) < MIN_DOCUMENTS:
        raise LlmpressError(f"the corpus has {len(docs)} document(s); at least {MIN_DOCUMENTS} are needed to split it")
    order = list(range(len(docs)))
    random.Random(params.seed).shuffle(order)
    n_eval = max(1, round(len(docs) * params.eval_fraction))
    eval_ids = set(order[:n_eval])
    calibration = [d for i, d in enumerate(docs) if i not in eval_ids]
    evaluation = [d for i, d in enumerate(docs) if i in eval_ids]
    return calibration, evaluation


def sample_passages(docs: list[str], params: DataParams) -> list[str]:
    """Seeded passages: start at a random word of a random document, continue through the following ones."""
    min_chars = params.seq_len * CHARS_PER_TOKEN
    total = sum(len(d) for d in docs)
    if total < min_chars:
        raise LlmpressError(
            f"the calibration documents hold {total} characters; one window of data.seq_len={params.seq_len} "
            f"tokens needs about {min_chars}. Use a larger corpus or a smaller seq_len."
        )
    rng = random.Random(params.seed + 1)
    passages = []
    for _ in range(params.calibration_samples):
        index = rng.randrange(len(docs))
        words = docs[index].split(" ")
        parts = [" ".join(words[rng.randrange(len(words)) :])]
        while sum(len(p) for p in parts) < min_chars:
            index = (index + 1) % len(docs)
            parts.append(docs[index])
        passages.append("\n\n".join(parts))
    return passages


def check_corpus(corpus: str, params: DataParams) -> None:
    """Refuse a corpus that the DVC stages would refuse, before anything is written: a missing file, the wrong
    kind, a line that is not text (see `read_documents`), too few documents to split, too little text for one
    calibration window."""
    if corpus == "gensim-lee":
        return
    path = Path(corpus)
    if not path.is_file():
        raise LlmpressError(
            f"corpus {corpus!r} (--data or data.corpus): no such file (a .txt or .jsonl corpus, or gensim-lee)"
        )
    if path.suffix not in (".txt", ".jsonl", ".cor"):
        raise LlmpressError(
            f"corpus {corpus!r} (--data or data.corpus): expected a .txt (one document per line) or .jsonl file"
        )
    calibration, _ = split_documents(read_documents(path), params)
    sample_passages(calibration, params)


def prepare(raw: Path, out_dir: Path, params: DataParams) -> dict:
    docs = read_documents(raw / RAW_NAME)
    calibration_docs, eval_docs = split_documents(docs, params)
    passages = sample_passages(calibration_docs, params)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(out_dir / "calibration.jsonl", "".join(json.dumps({"text": p}) + "\n" for p in passages))
    _write_atomic(out_dir / "eval.txt", "\n\n".join(eval_docs) + "\n")
    stats = {
        "documents": len(docs),
        "calibration_documents": len(calibration_docs),
        "eval_documents": len(eval_docs),
        "calibration_samples": len(passages),
        "eval_characters": sum(len(d) for d in eval_docs),
    }
    _write_atomic(out_dir / "stats.json", json.dumps(stats, indent=2) + "\n")
    return stats


def calibration_windows(tokenizer, path: str | Path, seq_len: int, add_bos: bool) -> torch.Tensor:
    """[samples, seq_len] token ids: each passage tokenized (BOS first if asked) and cut to seq_len."""
    rows = []
    bos = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            ids = bos + tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
            if len(ids) < seq_len:
                raise LlmpressError(
                    f"{path}:{number}: passage has {len(ids)} tokens, fewer than data.seq_len={seq_len}"
                )
            rows.append(ids[:seq_len])
    if not rows:
        raise LlmpressError(f"{path} holds no calibration passages")
    return torch.tensor(rows, dtype=torch.long)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmpress.data", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["fetch", "prepare"])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--raw", default="data/raw")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params).data
        if args.command == "fetch":
            path = fetch_corpus(params.corpus, Path(args.out or args.raw))
            print(f"corpus: {path} ({len(read_documents(path))} documents)")
        else:
            stats = prepare(Path(args.raw), Path(args.out or "data"), params)
            print("prepared: " + ", ".join(f"{k}={v}" for k, v in stats.items()))
    except LlmpressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
