"""Training with Lightning: `vlm fit|validate` (train.cli), the training system (train.module), data (train.data,
train.collate), run callbacks (train.callbacks) and checkpoint export (train.export). Inference never imports this."""
