"""The training system: which parameters train, decay and how fast; RNG states that survive safe loading."""

from __future__ import annotations

import io
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from vlm.train.module import VLMModule, adamw_options, rng_state, set_rng_state, warmup_cosine

from vlm.errors import VLMError


@pytest.fixture(scope="module")
def module():
    m = VLMModule(config="tiny", pretrained=False, lr_encoder=0.0, lr_projector=1e-3, lr_decoder=1e-4, warmup=10)
    m.trainer = SimpleNamespace(estimated_stepping_batches=110)
    return m


def test_zero_learning_rate_freezes_a_part_and_keeps_it_out_of_the_optimizer(module):
    assert not any(p.requires_grad for p in module.vlm.encoder.parameters())
    optimizer = module.configure_optimizers()["optimizer"]
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in module.vlm.encoder.parameters()}
    assert in_optimizer == {id(p) for p in module.parameters() if p.requires_grad}
    lrs = {g["name"]: g["initial_lr"] for g in optimizer.param_groups}  # peaks; "lr" is at warmup step 0
    assert lrs == {"projector": 1e-3, "projector_no_decay": 1e-3, "decoder": 1e-4, "decoder_no_decay": 1e-4}


def test_weight_decay_only_on_matrices(module):
    optimizer = module.configure_optimizers()["optimizer"]
    names = {id(p): n for n, p in module.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "vlm.projector.linear_1.weight" in decayed and "vlm.decoder.model.layers.0.mlp.up_proj.weight" in decayed
    assert "vlm.decoder.model.embed_tokens.weight" in plain  # embeddings (and the tied head) never decay
    assert "vlm.projector.linear_1.bias" in plain and "vlm.decoder.model.norm.weight" in plain
    assert all(module.get_parameter(n).ndim >= 2 for n in decayed)


def test_warmup_then_cosine_schedule():
    assert warmup_cosine(0, 10, 110, 0.1) == pytest.approx(1 / 11)
    assert warmup_cosine(9, 10, 110, 0.1) == pytest.approx(10 / 11)
    assert warmup_cosine(10, 10, 110, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(110, 10, 110, 0.1) == pytest.approx(0.1)


def test_rng_states_survive_a_weights_only_round_trip():
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    buffer = io.BytesIO()
    torch.save(rng_state(), buffer)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    buffer.seek(0)
    set_rng_state(torch.load(buffer, weights_only=True))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_nothing_to_train_and_bad_choices_are_one_line_errors():
    with pytest.raises(VLMError, match="choose a model"):
        VLMModule()
    with pytest.raises(VLMError, match="lr_decoder > 0"):
        VLMModule(config="tiny", pretrained=False, lr_decoder=0.0, lora={"r": 4})


def test_a_stage_can_deepen_the_decoder_and_move_the_images_after_the_text(tiny_checkpoint):
    m = VLMModule(
        init_from=str(tiny_checkpoint), expand_decoder=4, images_after_text=True, pretrained=False, lr_decoder=1e-3
    )
    # The layout reaches the processor that encodes the training rows, and what a checkpoint exports.
    assert m.processor.images_after_text and m.export_meta()["config"]["images_after_text"]
    assert b'"images_after_text": true' in bytes(m._processor_files["processor_config.json"].tolist())
    assert len(m.vlm.decoder.model.layers) == 4
    assert m.export_meta()["config"]["decoder"]["hf_config"]["num_hidden_layers"] == 4  # exports rebuild 4 layers
    assert m.training_record()["model"]["expand_decoder"] == {"from_layers": 2, "to_layers": 4}
    m.trainer = SimpleNamespace(estimated_stepping_batches=10)
    optimizer = m.configure_optimizers()["optimizer"]
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(m.vlm.decoder.model.layers[1].self_attn.o_proj.weight) in trained  # the new layers train


def test_adamw_is_fused_on_cuda_only(module):
    assert adamw_options("cuda") == {"fused": True}
    assert adamw_options("cpu") == {} and adamw_options("mps") == {}
    assert adamw_options("cuda", clips_mixed_precision=True) == {}  # Lightning would refuse to clip
    assert not module.configure_optimizers()["optimizer"].defaults["fused"]  # the module is on the CPU
    # Built with CUDA's options (fused AdamW also exists for CPU tensors, so no GPU is needed to build it).
    fused = torch.optim.AdamW(module.param_groups(), **adamw_options("cuda"))
    assert fused.defaults["fused"] is True
