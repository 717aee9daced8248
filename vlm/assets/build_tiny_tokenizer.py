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
# Words the shapes benchmark and common prompts use, so they become single tokens: at a sentence start, after a
# space and on a line of their own (a one-word answer, a chat role), as the chat template renders them.
DOMAIN_WORDS = """
what is the shape of red green blue orange gray yellow object circle square left right top bottom middle center
on or at image closest to furthest from how many objects have same as describe a an and with there are in
one two three four five six yes no user assistant system you helpful answer question briefly caption this picture
photo
""".split()
DOMAIN_TEXT = """
What is the shape of the red object? Is the green object on the left or on the right of the image?
Is the blue object at the top or at the bottom of the image? What is the shape of the object closest to the
orange object? What is the shape of the object furthest from the gray object? How many objects have the same
shape as the yellow object? Describe the image. a red square at the bottom left, a green circle at the top
center, an orange circle in the center. Caption this picture. Answer the question briefly.
"""


def corpus() -> list[str]:
    words = DOMAIN_WORDS + [w.capitalize() for w in DOMAIN_WORDS] + [str(i) for i in range(10)]
    texts = [DOMAIN_TEXT, " ".join(words), "\n".join(words)] * 200
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
