"""Builds the small byte-level BPE tokenizer that the `tiny` and `shapes` presets use.

The real presets use their decoder's own tokenizer; small models trained from scratch are faster with a
small vocabulary (the output layer dominates a tiny decoder's cost). Byte-level BPE still encodes any text.
Run `python vlm/assets/build_tiny_tokenizer.py` to rebuild `vlm/assets/tiny_tokenizer/`.
"""

import pydoc
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Words the shapes benchmark and common prompts use, so they become single tokens.
DOMAIN_TEXT = """
what is the shape of the red green blue orange gray yellow object? circle square left right top bottom middle
center is the object on the left or right of the image? is the object at the top or bottom of the image?
what is the shape of the object closest to the furthest from how many objects have the same shape as
describe the image. a an and at with there are one two three four five six 1 2 3 4 5 6 7 8 9 0 yes no
user assistant system you are a helpful assistant answer the question briefly caption this picture photo
"""


def corpus() -> list[str]:
    texts = [DOMAIN_TEXT] * 200
    for module in ("os", "json", "pathlib", "argparse", "collections", "functools", "re", "string", "random"):
        texts.append(pydoc.render_doc(module, renderer=pydoc.plaintext))
    return texts


def main(out: Path = Path(__file__).parent / "tiny_tokenizer") -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=2048
    )
    fast.save_pretrained(out)
    print(f"wrote {out} ({len(fast)} tokens)")


if __name__ == "__main__":
    main()
