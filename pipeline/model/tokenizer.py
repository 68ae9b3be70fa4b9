"""The embedded model's tokenizer: byte-level BPE trained with `tokenizers` on pipeline/data/corpus.txt."""

from __future__ import annotations

from pathlib import Path

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import ModelConfig
from pipeline.errors import PipelineError, read_text

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
CORPUS = DATA_DIR / "corpus.txt"
HELDOUT = DATA_DIR / "heldout.txt"
# Llama 3's names; training puts special tokens first, so they get ids 0 and 1.
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def train_embedded_tokenizer(model: ModelConfig, out_dir: Path, corpus: Path = CORPUS) -> int:
    """Train, check the special-token ids against the model config, save; return the vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = read_text(corpus, "save the tokenizer's training text as UTF-8")
    if not text.strip():
        raise PipelineError(f"{corpus}: empty; the embedded tokenizer needs training text")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=model.vocab_size, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.splitlines(), trainer=trainer)
    vocab = tok.get_vocab_size()
    if vocab > model.vocab_size:
        raise PipelineError(f"model.vocab_size={model.vocab_size} is smaller than the trained tokenizer ({vocab})")
    for token, key in ((BOS, "bos_token_id"), (EOS, "eos_token_id")):
        if tok.token_to_id(token) != getattr(model, key):
            raise PipelineError(f"model.{key}={getattr(model, key)} but the embedded tokenizer has {token} at "
                                f"{tok.token_to_id(token)}; set model.{key}={tok.token_to_id(token)}")
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)
    wrapped.save_pretrained(str(out_dir))
    return vocab
