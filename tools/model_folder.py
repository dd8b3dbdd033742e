"""Turn a local model into the folder the trainers, evaluate.py and vLLM take.

    python tools/model_folder.py path/to/model.gguf runs/models/smollm2      # a GGUF file, dequantised
    python tools/model_folder.py HuggingFaceTB/SmolLM2-135M-Instruct runs/models/smollm2   # a cached hub id

Writes a save_pretrained folder (config.json, model.safetensors, tokenizer files) and checks that the
saved tokenizer tokenises a probe text as the source's does (mathrl.models.save_model_folder). Then pass
the folder as --model. (A .gguf file also loads directly with --engine hf; vLLM needs the folder.)
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a .gguf file, a model folder, or a hub id in the local cache")
    parser.add_argument("out", help="the folder to write (must not hold a model already)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if (out / "config.json").exists():
        raise SystemExit(f"error: {out} already holds a model; choose another folder")
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: {out} is a file, not a folder")
    from mathrl import models

    models.check_model_path(args.source, flag="source")
    try:
        models.save_model_folder(args.source, out)
    except ValueError as error:
        raise SystemExit(f"error: {error}")
    print(f"model_folder: {args.source} -> {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e6:.0f} MB); "
          f"pass --model {os.fspath(out)}")


if __name__ == "__main__":
    main()
