"""Writes tests/fixtures/vocab/jpeg-320.json, the real tokenizer.json the readers' fuzz harness
(formats/src/fuzz.rs) mutates: a 320-entry byte-level BPE trained by HF `tokenizers` on four small
fixture JPEGs, with the template and trainer settings of `etl::tokenize::train_on_streams`
(pre-tokenized before every FF byte).

    python3 tools/make_vocab_fixture.py tests/fixtures/vocab/jpeg-320.json \
        tests/fixtures/odd/{gray,comment,progressive,exif_orient6}.jpg
"""
import json, sys
from tokenizers import Tokenizer, AddedToken
from tokenizers.trainers import BpeTrainer
files = sys.argv[2:]
template = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
    "pre_tokenizer": {"type": "Split", "pattern": {"String": chr(0x2800 + 0xFF)}, "behavior": "MergedWithNext", "invert": False},
    "post_processor": None, "decoder": None,
    "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
        "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False, "vocab": {}, "merges": []}}
tok = Tokenizer.from_str(json.dumps(template))
trainer = BpeTrainer(vocab_size=320, min_frequency=0, show_progress=False,
    special_tokens=[AddedToken(s, special=True) for s in ["<s>", "</s>", "<pad>"]],
    initial_alphabet=[chr(0x2800 + b) for b in range(256)])
texts = ["".join(chr(0x2800 + b) for b in open(f, "rb").read()) for f in files]
tok.train_from_iterator(texts, trainer)
open(sys.argv[1], "w").write(tok.to_str())
