"""Interop with transformers' LLaVA: export a vlm checkpoint as a `LlavaForConditionalGeneration` folder and
import one back, so vlm models can be served with transformers, vLLM and friends, and LLaVA models fine-tuned here.

The mapping is exact, not approximate: a timm ViT with a class token and a pre-norm is a CLIP vision tower, one
with neither is a SigLIP tower (qkv split into q/k/v, same norms, activations and position embeddings); vlm's
features (block output before the final norm, later blocks pruned) are LLaVA's `hidden_states[vision_feature_layer]`;
the MLP projector is LLaVA's `multi_modal_projector`; the decoder is LLaVA's `language_model`. Anything that does not
map exactly (other encoders, the pixel-shuffle projector) is refused.

- `keys.py`: the weight-name table (and activation names), read forwards by export and backwards by import.
- `templates.py`: the chat-template prologues between vlm's text content and transformers' list-of-parts content.
- `export.py`: `export_hf` (`vlm export-hf`); `load.py`: `import_hf` (`vlm import-hf`).
"""

from vlm.llava.export import export_hf
from vlm.llava.load import import_hf

__all__ = ["export_hf", "import_hf"]
