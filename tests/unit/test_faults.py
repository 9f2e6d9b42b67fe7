"""Faults injected into the writing and loading of model folders and into the compress step: each ends in a clear
error or a recovery, and never in a half-written or silently wrong folder."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from flows.cli import main
from llmpress import steps
from llmpress.config import CompressParams, DataParams
from llmpress.errors import LlmpressError
from llmpress.sources import CHECKSUMS, load_model
from tests.unit.conftest import build_tiny_llama, byte_tokenizer_json

REPO = Path(__file__).resolve().parents[2]


def tokenizer(tmp_path: Path) -> PreTrainedTokenizerFast:
    folder = tmp_path / "tok"
    folder.mkdir(exist_ok=True)
    return PreTrainedTokenizerFast(tokenizer_file=str(byte_tokenizer_json(folder)), bos_token="!", eos_token="~")


def saved_tiny(tmp_path: Path, name: str = "model") -> Path:
    out = tmp_path / "models" / name
    steps.save_model(build_tiny_llama(), tokenizer(tmp_path), out, extra_files={})
    return out


def test_saved_folder_lists_every_file_and_reloads_identically(tmp_path: Path) -> None:
    out = saved_tiny(tmp_path)
    sums = json.loads((out / CHECKSUMS).read_text())
    assert set(sums) == {p.name for p in out.iterdir()} - {CHECKSUMS}
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(load_model(out)(ids).logits, build_tiny_llama()(ids).logits)
    assert [p.name for p in out.parent.iterdir()] == ["model"]  # no temporary sibling left


def test_a_corrupted_file_is_refused_on_load(tmp_path: Path) -> None:
    out = saved_tiny(tmp_path)
    weights = out / "model.safetensors"
    original = weights.read_bytes()
    data = bytearray(original)
    data[-100] ^= 0x01  # one bit in a tensor: the header still parses, only the hash can tell
    weights.write_bytes(bytes(data))
    with pytest.raises(LlmpressError, match=r"sha256 differs from checksums\.json"):
        load_model(out)
    weights.write_bytes(original)
    (out / "tokenizer.json").unlink()
    with pytest.raises(LlmpressError, match="missing"):
        load_model(out)


def test_disk_full_while_saving_leaves_nothing(tmp_path: Path) -> None:
    """A real write failure from the OS (RLIMIT_FSIZE: files may not grow past 64 KiB, as on a full disk)."""
    out = tmp_path / "models" / "model"
    script = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        from pathlib import Path
        from transformers import PreTrainedTokenizerFast
        from llmpress import steps
        from tests.unit.conftest import build_tiny_llama, byte_tokenizer_json
        tok = PreTrainedTokenizerFast(tokenizer_file=str(byte_tokenizer_json(Path({str(tmp_path)!r}))))
        model = build_tiny_llama()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
        from llmpress.errors import LlmpressError
        try:
            steps.save_model(model, tok, Path({str(out)!r}), extra_files={{}})
        except LlmpressError as exc:
            print("error:", exc)
            sys.exit(3)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "nothing was saved" in result.stdout and "File too large" in result.stdout
    assert not out.exists() and list(out.parent.iterdir()) == []  # no folder, no temporary sibling


def test_a_killed_writers_temporary_folder_is_removed_by_the_next_save(tmp_path: Path) -> None:
    parent = tmp_path / "models"
    parent.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = parent / f".model-{int(gone.stdout)}-abc123"  # what a SIGKILL during a save leaves
    (dead / "half").mkdir(parents=True)
    (dead / "half" / "model.safetensors").write_bytes(b"\0" * 100)
    import os

    live = parent / f".other-{os.getpid()}-def456"  # a save in progress in a live process: kept
    live.mkdir()
    saved_tiny(tmp_path)
    assert not dead.exists() and live.exists()
    assert load_model(parent / "model") is not None


def _compress_inputs(tmp_path: Path, poison: bool = False) -> tuple[Path, Path]:
    model = build_tiny_llama()
    if poison:
        with torch.no_grad():
            model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    folder = tmp_path / "base"
    steps.save_model(model, tokenizer(tmp_path), folder, extra_files={})
    calibration = tmp_path / "calibration.jsonl"
    passage = "the quick brown fox jumps over the lazy dog and keeps running far away "
    calibration.write_text("".join(json.dumps({"text": passage * 2}) + "\n" for _ in range(4)))
    return folder, calibration


def _compress(folder: Path, calibration: Path, out: Path, md5: str | None = None) -> dict:
    recipe = out.parent / "wanda.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text("name: w\nstages:\n  - method: wanda\n    sparsity: 0.5\n")
    return steps.compress(steps.CompressJob(
        model_path=str(folder), recipe_path=str(recipe), calibration=steps.DataFile(path=str(calibration), md5=md5),
        out_dir=str(out), data=DataParams(seq_len=32), add_bos=True, params=CompressParams(device="cpu", batch_size=2),
        lineage={}))  # fmt: skip


def test_nan_from_compression_is_refused_and_nothing_saved(tmp_path: Path) -> None:
    folder, calibration = _compress_inputs(tmp_path, poison=True)
    out = tmp_path / "out" / "hf"
    with pytest.raises(LlmpressError, match=r"NaN/Inf in model\.layers\.1\.mlp\.up_proj\.weight"):
        _compress(folder, calibration, out)
    assert not out.exists()


def test_calibration_data_changed_after_versioning_is_refused(tmp_path: Path) -> None:
    import hashlib

    folder, calibration = _compress_inputs(tmp_path)
    recorded = hashlib.md5(calibration.read_bytes()).hexdigest()
    out = tmp_path / "out" / "hf"
    assert _compress(folder, calibration, out, recorded)["path"] == str(out.resolve())  # the recorded version: ok
    calibration.write_text(calibration.read_text().replace("fox", "cat"))
    with pytest.raises(LlmpressError, match="changed after DVC versioned it"):
        _compress(folder, calibration, tmp_path / "out2" / "hf", recorded)
    assert not (tmp_path / "out2" / "hf").exists()


def test_pickled_weights_only_with_the_loud_flag_and_weights_only(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "pickled"
    model = build_tiny_llama()
    model.config.save_pretrained(folder)
    byte_tokenizer_json(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # a legacy checkpoint (transformers 5 won't write one)
    assert (folder / "pytorch_model.bin").is_file() and not list(folder.glob("*.safetensors"))
    assert main(["--project", str(tmp_path), "resolve", str(folder)]) == 2
    assert "only pickled weights" in capsys.readouterr().err
    assert main(["--project", str(tmp_path), "resolve", str(folder), "--unsafe-load-pickled-weights"]) == 0
    converted = tmp_path / "models" / "pickled-safetensors"
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(load_model(converted)(ids).logits, build_tiny_llama()(ids).logits)
    # a pickle that would run code is refused by weights_only=True, with the file named
    evil = tmp_path / "evil"
    build_tiny_llama().config.save_pretrained(evil)
    torch.save({"w": torch.zeros(1), "x": subprocess.Popen}, evil / "pytorch_model.bin")
    assert main(["--project", str(tmp_path), "resolve", str(evil), "--unsafe-load-pickled-weights"]) == 2
    assert "unpickles nothing else" in capsys.readouterr().err
    assert not (tmp_path / "models" / "evil-safetensors").exists()


def test_refusals_are_not_retried_and_io_trouble_is() -> None:
    """Prefect's retry condition of the I/O tasks: a refusal (bad input, a missing model) fails the same way every
    time, so it is not retried; anything else may be transient."""
    from prefect.states import Completed, Failed

    from llmpress.errors import ConfigError, LlmpressError
    from tasks import transient

    assert not transient(None, None, Failed(data=LlmpressError("no such model")))
    assert not transient(None, None, Failed(data=ConfigError("eval.window: must be > 0")))
    assert transient(None, None, Failed(data=ConnectionError("MLflow is restarting")))
    assert transient(None, None, Completed(data=None))
