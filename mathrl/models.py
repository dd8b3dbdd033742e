"""Models and tokenizers: a hub id, a local save_pretrained folder, a GGUF file, or `tiny` (a ~1M-parameter
Qwen2 with a character tokenizer, for CPU runs). check_model_path says in one line, before anything
loads, why a --model cannot load.
"""
import os
from pathlib import Path

import torch


def build_tiny_tokenizer():
    """A character-level tokenizer for the synthetic tasks: one token per printable ASCII char.

    It is a byte-level BPE with no merges, the same kind of tokenizer as Qwen2's. That matters:
    `AutoTokenizer` reloads any tokenizer saved beside a Qwen2 config as `Qwen2Tokenizer`, whose
    byte-level pre-tokenizer silently drops spaces and newlines from a plain character vocabulary.
    Written in byte-level form (space = "Ġ", newline = "Ċ"), the round trip is exact.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    symbols = [byte_level.pre_tokenize_str(chr(b))[0][0] for b in [10, *range(32, 127)]]
    backend = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(symbols)}, merges=[]))
    backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    eos, *extra = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, pad_token=eos,
                                   additional_special_tokens=extra)


def build_tiny_model(hidden_size=128, num_layers=4, num_heads=4, max_positions=1024, seed=0):
    """A Qwen2-architecture model small enough to train on a laptop CPU in minutes."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2), max_position_embeddings=max_positions,
        tie_word_embeddings=True, bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config), tokenizer


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    path, gguf_file = _split_gguf(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))
    if tokenizer.pad_token is None:  # batching needs a pad token; it is always masked out
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str, dtype=torch.float32, rope_theta: float = 0.0, max_positions: int = 0):
    """Loads a causal LM in the dtype its master weights are kept in (fp32; bf16 compute comes from FSDP).
    rope_theta, max_positions (0: the model's own): --rope-theta, --max-position-embeddings, set in the
    config before the model is built, so the model computes with them and every save carries them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path, gguf_file = _split_gguf(name_or_path)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    config = AutoConfig.from_pretrained(path, **kwargs)
    try:
        config_overrides(config, rope_theta, max_positions)
    except ValueError as error:  # before any weight loads
        raise SystemExit(f"error: {error}") from None
    return AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, **kwargs)


def save_model_folder(source: str, out) -> Path:
    """The one way in for a local model: `source` (a .gguf file, a hub id or a model folder) written as
    the save_pretrained folder every trainer, evaluate.py and vLLM load. A GGUF file is dequantised to
    fp32 (transformers' GGUF reader) and re-saved as a plain model: transformers refuses to save a model
    it marks as GGUF-quantised, and vLLM's trainers' engine takes a folder. The tokenizer is saved beside
    it and reloaded: a probe text must tokenise to the same ids (transformers 5 can reload a custom
    tokenizer as another class that drops spaces), else ValueError."""
    from transformers import AutoModelForCausalLM

    out = Path(out)
    model, tokenizer = load_model(source), load_tokenizer(source)
    if getattr(model.config, "quantization_config", None) is not None and source.endswith(".gguf"):
        del model.config.quantization_config  # dequantised already: what remains is a plain model
        plain = AutoModelForCausalLM.from_config(model.config)
        plain.load_state_dict(model.state_dict())
        model = plain
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    probe = "Solve for x:  2x + 3 = 11.\n Answer: \\boxed{4}  "
    reloaded = load_tokenizer(str(out))
    if reloaded(probe)["input_ids"] != tokenizer(probe)["input_ids"]:
        raise ValueError(f"{out}: the saved tokenizer ({type(reloaded).__name__}) tokenises differently from "
                         f"{source}'s ({type(tokenizer).__name__})")
    return out


def config_overrides(config, rope_theta: float = 0.0, max_positions: int = 0) -> dict:
    """Set --rope-theta / --max-position-embeddings on a transformers config (in place) and return them as
    vLLM's hf_overrides, so the engine computes as the trainer does. Longer context for Qwen2.5-Math
    (4,096 positions, theta 10,000): open-r1 trained on 32k tokens from Qwen2.5-Math-7B with the RoPE base
    raised to 300,000 (its model open-r1/Qwen2.5-Math-7B-RoPE-300k, the base of OpenR1-Distill-7B) and
    max_position_embeddings 32,768."""
    overrides = {}
    if rope_theta:
        rope = getattr(config, "rope_parameters", None)  # transformers 5: {"rope_type", "rope_theta", ...}
        if not rope or "rope_theta" not in rope:
            raise ValueError(f"--rope-theta: this {config.model_type} model has no rotary position embedding")
        overrides["rope_parameters"] = config.rope_parameters = {**rope, "rope_theta": float(rope_theta)}
    if max_positions:
        overrides["max_position_embeddings"] = config.max_position_embeddings = max_positions
    return overrides


def _split_gguf(name_or_path: str):
    """`dir/model.gguf` loads through transformers' GGUF reader (e.g. the SmolLM2 test model)."""
    if name_or_path.endswith(".gguf"):
        return str(Path(name_or_path).parent), Path(name_or_path).name
    return name_or_path, None


def check_model_path(name_or_path: str, flag: str = "--model"):
    """Fail in a second, naming the flag, when a model cannot load: a missing path, a folder that is
    not a model, a hub id that is neither in the local cache nor on a reachable hub. Never minutes of
    download retries: with HF_HUB_OFFLINE set the hub is not asked, otherwise asked once, briefly."""
    path = os.path.expanduser(name_or_path)
    if path.endswith(".gguf") or os.path.exists(path):
        if path.endswith(".gguf") and not os.path.isfile(path):
            raise SystemExit(f"error: {flag} {name_or_path!r}: no such GGUF file")
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
            raise SystemExit(f"error: {flag} {name_or_path!r} is a folder without config.json, "
                             f"not a saved model")
        if os.path.isfile(path) and not path.endswith(".gguf"):
            raise SystemExit(f"error: {flag} {name_or_path!r} is a file; expected a model folder, "
                             f".gguf file or hub id")
        return
    if len(path.split("/")) != 2 or path.startswith((".", "/")):
        raise SystemExit(f"error: {flag} {name_or_path!r} is neither a local path nor a hub id (org/name)")
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(path, "config.json"), str):
        return
    missing = f"error: {flag} {name_or_path!r}: no such local folder, and not in the Hugging Face cache"
    if constants.HF_HUB_OFFLINE:
        raise SystemExit(f"{missing} (HF_HUB_OFFLINE is set: nothing is downloaded); "
                         f"pass a local model folder")
    try:
        HfApi().model_info(path, timeout=10)
    except GatedRepoError:
        pass  # it exists; the download says whether this login may read it
    except RepositoryNotFoundError:
        raise SystemExit(f"{missing} or on the hub") from None
    except Exception as error:  # no network, DNS, timeout: say so now rather than after the loader's retries
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise SystemExit(f"{missing}, and the hub cannot be reached ({reason})") from None
