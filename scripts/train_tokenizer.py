"""Train the course's byte-level BPE tokenizer on the corpus and tokenize it for pretraining.

A GPT-2 style byte-level BPE (every byte is a token, so no text is ever unknown) with digits split
one by one (as Llama does, so numbers in the task data tokenize the same way wherever they appear),
vocabulary 8192 including the special tokens <s> (beginning of text), </s> (end) and <pad>.
Saved as a Hugging Face fast tokenizer in data/tiny/ (tokenizer.json + tokenizer_config.json), so
`AutoTokenizer.from_pretrained("data/tiny")` works like for a hub model.

    python scripts/train_tokenizer.py [--corpus .scratch/corpus] [--vocab 8192]

Also writes .scratch/corpus/{train,val}.bin: uint16 token ids of each document with </s> after it,
the input of scripts/pretrain.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
SPECIALS = ["<s>", "</s>", "<pad>"]
SEP = "\n\n\f\n"


def build(texts: list[str], vocab: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=ROOT / ".scratch" / "corpus")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "tiny")
    args = ap.parse_args()
    train = (args.corpus / "train.txt").read_text(encoding="utf-8").split(SEP)
    val = (args.corpus / "val.txt").read_text(encoding="utf-8").split(SEP)
    tok = build(train, args.vocab)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=512)
    fast.save_pretrained(args.out)
    eos = tok.token_to_id("</s>")
    for name, docs in (("train", train), ("val", val)):
        ids = []
        for enc in tok.encode_batch(docs, add_special_tokens=False):
            ids.extend(enc.ids)
            ids.append(eos)
        arr = np.array(ids, dtype=np.uint16)
        arr.tofile(args.corpus / f"{name}.bin")
        print(f"{name}: {len(docs)} documents, {arr.size:,} tokens, "
              f"{sum(map(len, docs)) / arr.size:.2f} characters per token")


if __name__ == "__main__":
    main()
