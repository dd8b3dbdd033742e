import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path[:0] = [str(ROOT), str(ROOT / "experiments"), str(ROOT / "tools")]  # experiments/, tools/ as their scripts see them
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never download: a hub lookup would only time out


def shared_file(relative: str) -> Path:
    """A file of ../shared/data (real benchmark copies), or skip the test when it is absent."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"{path} is absent (real data copies live beside the project, not in it)")
    return path


def kill_after_first_checkpoint(command: list[str], output_dir: Path):
    """Start a training command and SIGKILL it as soon as output_dir/checkpoint-2 is complete."""
    import signal
    import subprocess
    import time

    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (output_dir / "checkpoint-2").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (output_dir / "model.safetensors").exists(), "the run finished before it could be killed"


# A tokenizer with a minimal chat template: renders prompts with no vocabulary to load.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def chat_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, "[UNK]")))
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tiny_model(folder: Path, **sizes) -> Path:
    """A random tiny Qwen2 (models.build_tiny_model's sizes) and its tokenizer, saved as a model folder."""
    from mathrl import models

    model, tokenizer = models.build_tiny_model(**sizes)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
