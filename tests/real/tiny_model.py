"""Build a tiny random-weight Llama model that a real vLLM server can load on a CPU.

The real test tier needs *some* model, and CI may never download one, so this script makes one
from nothing: a byte-level BPE tokenizer trained on a generated corpus, a chat template, and a
2-layer Llama with random bfloat16 weights. Its output is gibberish; the point is that vLLM
tokenizes, schedules, streams and counts tokens exactly as it does for a real model.

Run it with the vLLM virtualenv's Python (it needs ``torch``, ``transformers`` and
``tokenizers``, which the project's own environment doesn't have)::

    /opt/fg-vllm/bin/python tests/real/tiny_model.py ~/.cache/fleetgate/tiny-llama

``build(out_dir)`` is idempotent: a marker file records the spec the directory was built from,
and a directory whose marker matches is left alone. A build writes into a sibling temporary
directory and renames it into place, so a crashed or concurrent build never leaves a
half-written model behind under ``out_dir``. The same spec and library versions give the same
tokenizer and weights (fixed corpus, fixed seed).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

MARKER = "fleetgate-tiny.json"

# Anything that changes the built files belongs in SPEC, so that a change rebuilds the model.
SPEC: dict[str, Any] = {
    "format": 1,
    "seed": 1234,
    "vocab_size": 1024,
    "hidden_size": 128,
    # head_dim 64: vLLM's CPU attention kernels reject small head sizes (16 crashes).
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "intermediate_size": 256,
    "max_position_embeddings": 2048,
    "torch_dtype": "bfloat16",
    "corpus_lines": 4000,
}

BOS, EOS, PAD = "<s>", "</s>", "<pad>"

# Deliberately plain: one line per message, then the assistant's turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_WORDS = (
    "the a an gateway fleet model server request response token key user admin stream chunk "
    "usage prompt completion chat message system assistant role content health ready replica "
    "queue limit rate budget quota error status upstream downstream proxy route port host "
    "launch drain scale slurm node gpu cpu memory cache batch latency throughput of to in on "
    "for with by from and or not is are was be has have this that it we you they quick brown "
    "fox jumps over lazy dog hello world python test real tiny llama vllm openai json http"
).split()


def corpus(lines: int, seed: int) -> list[str]:
    """A generated, reproducible text corpus: seeded word salad plus digits and punctuation."""
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        if i % 5 == 0:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
        line = " ".join(words)
        out.append(line[:1].upper() + line[1:] + rng.choice(".?!:;,"))
    return out


def is_built(out_dir: Path) -> bool:
    try:
        return bool(json.loads((out_dir / MARKER).read_text()) == SPEC)
    except (OSError, ValueError):
        return False


def _write(tmp: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    seed = int(SPEC["seed"])
    random.seed(seed)
    torch.manual_seed(seed)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=int(SPEC["vocab_size"]),
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus(int(SPEC["corpus_lines"]), seed), trainer=trainer)

    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=None
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = int(SPEC["max_position_embeddings"])
    tok.save_pretrained(tmp)

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=SPEC["hidden_size"],
        intermediate_size=SPEC["intermediate_size"],
        num_hidden_layers=SPEC["num_hidden_layers"],
        num_attention_heads=SPEC["num_attention_heads"],
        num_key_value_heads=SPEC["num_key_value_heads"],
        max_position_embeddings=SPEC["max_position_embeddings"],
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(tmp)
    (tmp / MARKER).write_text(json.dumps(SPEC, indent=2, sort_keys=True) + "\n")


def build(out_dir: str | os.PathLike[str]) -> Path:
    """Make sure ``out_dir`` holds the tiny model described by ``SPEC``; return its path."""
    out = Path(out_dir).expanduser().resolve()
    if is_built(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        if out.exists() and not is_built(out):
            shutil.rmtree(out)  # built from an older SPEC
        try:
            os.replace(tmp, out)
        except OSError:
            if not is_built(out):  # a concurrent build that won the rename is fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: tiny_model.py OUT_DIR", file=sys.stderr)
        return 2
    print(build(argv[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
