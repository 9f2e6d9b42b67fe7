from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmpress.config import DataParams
from llmpress.data import (
    CHARS_PER_TOKEN,
    calibration_windows,
    prepare,
    read_documents,
    sample_passages,
    split_documents,
)
from llmpress.errors import LlmpressError


def _docs(n: int = 50, words: int = 40) -> list[str]:
    return [" ".join(f"doc{i}word{j}" for j in range(words)) for i in range(n)]


def test_split_documents_deterministic_disjoint_complete() -> None:
    docs = _docs()
    params = DataParams(eval_fraction=0.2, seed=7)
    cal1, ev1 = split_documents(docs, params)
    cal2, ev2 = split_documents(docs, params)
    assert (cal1, ev1) == (cal2, ev2)
    assert len(ev1) == 10 and len(cal1) == 40
    assert set(cal1).isdisjoint(ev1)
    assert sorted(cal1 + ev1) == sorted(docs)
    # both parts keep corpus order
    assert ev1 == [d for d in docs if d in set(ev1)]
    assert cal1 == [d for d in docs if d in set(cal1)]


def test_split_documents_different_seeds_differ() -> None:
    docs = _docs()
    splits = {tuple(split_documents(docs, DataParams(seed=seed))[1]) for seed in range(5)}
    assert len(splits) == 5


@pytest.mark.parametrize(("n", "fraction", "n_eval"), [(4, 0.01, 1), (10, 0.5, 5), (7, 0.3, 2), (300, 0.2, 60)])
def test_split_documents_eval_count(n: int, fraction: float, n_eval: int) -> None:
    cal, ev = split_documents(_docs(n), DataParams(eval_fraction=fraction))
    assert len(ev) == n_eval
    assert len(cal) == n - n_eval


def test_split_documents_too_few_documents() -> None:
    with pytest.raises(LlmpressError, match="3 document"):
        split_documents(_docs(3), DataParams())


def test_sample_passages_deterministic_and_long_enough() -> None:
    docs = _docs(30)
    params = DataParams(calibration_samples=12, seq_len=64, seed=3)
    a = sample_passages(docs, params)
    b = sample_passages(docs, params)
    assert a == b
    assert len(a) == 12
    for passage in a:
        assert len(passage) >= 64 * CHARS_PER_TOKEN
    assert a != sample_passages(docs, DataParams(calibration_samples=12, seq_len=64, seed=4))


def test_sample_passages_content_comes_from_documents() -> None:
    docs = _docs(10)
    vocabulary = {w for d in docs for w in d.split(" ")}
    for passage in sample_passages(docs, DataParams(calibration_samples=5, seq_len=32)):
        words = passage.replace("\n\n", " ").split(" ")
        assert set(words) <= vocabulary


def test_sample_passages_wraps_around_small_corpus() -> None:
    docs = ["a b c d e f g h", "i j k l m n o p"] * 10  # 20 short docs, total 300 chars
    passages = sample_passages(docs, DataParams(calibration_samples=3, seq_len=32))  # needs 256 chars each
    assert all(len(p) >= 256 for p in passages)


def test_sample_passages_corpus_too_small() -> None:
    docs = ["tiny doc"] * 5
    with pytest.raises(LlmpressError, match=r"seq_len=256"):
        sample_passages(docs, DataParams(seq_len=256))


def test_read_documents_txt(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("first  doc\twith   spaces\n\n   \nsecond doc\n", encoding="utf-8")
    assert read_documents(path) == ["first doc with spaces", "second doc"]


def test_read_documents_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"text": "héllo  world"}), "", json.dumps({"text": "  "})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert read_documents(path) == ["héllo world"]


@pytest.mark.parametrize("bad", ["{not json", json.dumps({"body": "x"}), json.dumps(["text"])])
def test_read_documents_bad_jsonl_names_line(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n\n" + bad + "\n", encoding="utf-8")
    with pytest.raises(LlmpressError, match=r"corpus\.jsonl:3: expected a JSON object with a 'text' field"):
        read_documents(path)


def test_prepare_writes_outputs(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    docs = _docs(20)
    (raw / "corpus.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    params = DataParams(eval_fraction=0.25, calibration_samples=6, seq_len=32, seed=1)
    out = tmp_path / "out"
    stats = prepare(raw, out, params)

    assert sorted(p.name for p in out.iterdir()) == ["calibration.jsonl", "eval.txt", "stats.json"]
    passages = [json.loads(line)["text"] for line in (out / "calibration.jsonl").read_text().splitlines()]
    assert len(passages) == 6
    eval_docs = (out / "eval.txt").read_text().rstrip("\n").split("\n\n")
    assert len(eval_docs) == 5
    assert json.loads((out / "stats.json").read_text()) == stats
    assert stats == {
        "documents": 20,
        "calibration_documents": 15,
        "eval_documents": 5,
        "calibration_samples": 6,
        "eval_characters": sum(len(d) for d in eval_docs),
    }
    # no evaluation document leaks into calibration passages
    for passage in passages:
        for doc in eval_docs:
            assert doc not in passage
    # deterministic: a second run writes the same bytes
    out2 = tmp_path / "out2"
    prepare(raw, out2, params)
    for name in ("calibration.jsonl", "eval.txt", "stats.json"):
        assert (out / name).read_bytes() == (out2 / name).read_bytes()


def _write_passages(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.mark.parametrize("add_bos", [True, False])
def test_calibration_windows_shape_and_bos(tmp_path: Path, char_tokenizer, add_bos: bool) -> None:
    path = _write_passages(tmp_path / "calibration.jsonl", ["abcdefghijklmnopqrstuvwxyz", "z" * 40, "0123456789" * 3])
    ids = calibration_windows(char_tokenizer, path, seq_len=16, add_bos=add_bos)
    assert ids.shape == (3, 16)
    assert ids.dtype == torch.long
    if add_bos:
        assert ids[:, 0].tolist() == [0, 0, 0]
        assert ids[0, 1:].tolist() == [ord(c) % 255 + 1 for c in "abcdefghijklmno"]
    else:
        assert (ids[:, 0] != 0).all()
        assert ids[0].tolist() == [ord(c) % 255 + 1 for c in "abcdefghijklmnop"]


def test_calibration_windows_passage_too_short(tmp_path: Path, char_tokenizer) -> None:
    path = _write_passages(tmp_path / "calibration.jsonl", ["x" * 40, "short"])
    with pytest.raises(LlmpressError, match=r"calibration\.jsonl:2: passage has 6 tokens, fewer than data\.seq_len=16"):
        calibration_windows(char_tokenizer, path, seq_len=16, add_bos=True)


def test_calibration_windows_empty_file(tmp_path: Path, char_tokenizer) -> None:
    path = _write_passages(tmp_path / "calibration.jsonl", [])
    with pytest.raises(LlmpressError, match="no calibration passages"):
        calibration_windows(char_tokenizer, path, seq_len=16, add_bos=True)
