"""Training with Lightning: `vlm fit|validate` (vlm.train.cli), the training system (vlm.train.module), the data
module (vlm.train.data), run callbacks (vlm.train.callbacks) and `vlm diagnose`. Inference never imports this."""
