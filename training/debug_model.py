"""A ~1M-parameter Llama and a byte-level BPE tokenizer, built from config and local text: no download.

Every path of the platform (training, export, serving, the local demo) must run on CPU in seconds, and the
tests need a real Hugging Face model directory to load. This module writes one:

    python -m training.debug_model --out /tmp/debug-model

The result is deterministic (seeded weights, a tokenizer trained on `training/assets/corpus.txt`) so that two
calls produce the same files and tests can compare outputs across processes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
CORPUS_PATH = ASSETS_DIR / "corpus.txt"

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN, IM_START, IM_END]

# ChatML, the format most open instruct models use, so that prompts built by the serving container look like
# the ones a real model expects. The assistant turn ends with <|im_end|>, which is also a stop token.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

VOCAB_SIZE = 1024
"""Upper bound for BPE training; the small corpus yields fewer tokens, and the model's vocabulary is sized to
the tokenizer's actual length so that every id the model can emit decodes to text."""
SEED = 0

# Shape of the debug Llama: ~1M parameters. GQA (4 query heads, 2 KV heads) and untied embeddings keep it
# structurally like the 1B-8B models, so sharding, checkpointing and export exercise the same code paths.
DEBUG_MODEL_SHAPE: dict[str, int | float | bool] = {
    "hidden_size": 128,
    "intermediate_size": 344,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}


def build_tokenizer(corpus: Path = CORPUS_PATH, vocab_size: int = VOCAB_SIZE):  # -> PreTrainedTokenizerFast
    """Train a byte-level BPE tokenizer on local text and wrap it as a `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Byte level: every string is encodable, there is no unknown token, and decode(encode(x)) == x.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.read_text(encoding="utf-8").splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=int(DEBUG_MODEL_SHAPE["max_position_embeddings"]),
    )


def build_model(tokenizer, seed: int = SEED):  # -> LlamaForCausalLM
    """A freshly initialised debug Llama whose special-token ids match `tokenizer`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **DEBUG_MODEL_SHAPE,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)],
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # An untrained model picks tokens at random and, with seed 0, stops on <|endoftext|> at the first step, so
    # smoke tests of serving would see empty answers. A zero output row gives a special token a logit of exactly 0
    # while ordinary tokens spread around it, so the untrained model practically never emits one; training
    # relearns these rows like any other.
    with torch.no_grad():
        for token in SPECIAL_TOKENS:
            model.lm_head.weight[tokenizer.convert_tokens_to_ids(token)].zero_()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        max_new_tokens=32,
        do_sample=False,
    )
    return model


def write_debug_model(out_dir: str | Path) -> Path:
    """Write the debug model and tokenizer to `out_dir` in Hugging Face format; returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.debug_model", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory to write the model and tokenizer to")
    args = parser.parse_args(argv)
    out = write_debug_model(args.out)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
