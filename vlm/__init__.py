"""vlm: a small, fast, hackable vision-language model toolkit.

Start from `vlm.checkpoint.load` (a checkpoint folder -> model and processor), `vlm.generation.generate_texts`,
`vlm.model.VisionLanguageModel` and `vlm.config.VLMConfig`. Nothing heavy is imported here, so the console
script starts fast.
"""

__version__ = "0.1.0"
