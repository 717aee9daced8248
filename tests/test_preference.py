"""Preference and RL tuning end to end on the tiny preset: `vlm fit-dpo` raises the chosen-vs-rejected margin and
resumes exactly, `vlm fit-reward` ranks held-out pairs, `vlm fit-grpo` raises its reward, and broken pairs are
counted like broken rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from vlm.train.cli import main, make_cli
from vlm.train.grpo import answer_mask
from vlm.train.losses import dpo_loss
from vlm.train.preference import _answer_logps
from vlm.train.rewards import Rewards, RewardSpec, Rollout

from vlm.checkpoint import load
from vlm.data import RowError, read_pairs
from vlm.errors import VLMError
from vlm.llava.export import export_hf
from vlm.reward import load_reward_model, reward
from vlm.training_ckpt import import_ckpt

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "samples" / "data" / "shapes-mini"
torch.set_num_threads(1)
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false"]


def tiny_args(root: Path, train: Path, val: Path, steps: int) -> list[str]:
    return [
        "--model.init_from=null",
        "--model.config=tiny",
        "--model.pretrained=false",
        "--model.warmup=0",
        f"--data.train={train}",
        f"--data.val={val}",
        "--data.num_workers=0",
        "--data.batch_size=8",
        f"--trainer.default_root_dir={root}",
        "--trainer.accelerator=cpu",
        f"--trainer.max_steps={steps}",
        "--trainer.log_every_n_steps=1",
        *QUIET,
    ]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[str, Path]:
    """Shape questions of the shipped sample as pairs: 'wrong' (the other shape rejected: 32 train, 16 held out) and
    'separable' (a refusal rejected, which a reward model tells apart from the text alone)."""
    out = tmp_path_factory.mktemp("pairs")
    rows = [json.loads(line) for line in (SHAPES / "train.jsonl").read_text().splitlines()]
    shape = [r for r in rows if r["subtype"] == "shape"][:48]
    made = {}
    for name, rejected in (
        ("wrong", lambda r: {"circle": "square", "square": "circle"}[r["answer"]]),
        ("separable", lambda r: "I cannot tell"),
    ):
        lines = [
            json.dumps(
                {
                    "image": str(SHAPES / r["image"]),
                    "prompt": r["question"],
                    "chosen": r["answer"],
                    "rejected": rejected(r),
                }
            )
            for r in shape
        ]
        for split, part in (("train", lines[:32]), ("val", lines[32:])):
            made[f"{name}_{split}"] = out / f"{name}_{split}.jsonl"
            made[f"{name}_{split}"].write_text("\n".join(part) + "\n")
    return made


def test_broken_pairs_are_rows_with_a_reason(tmp_path):
    bad = [
        {"prompt": "q", "chosen": "circle", "rejected": " circle "},
        {"prompt": "q", "chosen": "", "rejected": "square"},
        {"prompt": "q", "chosen": "circle"},
        {"prompt": "q", "chosen": "circle", "rejected": "square"},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in bad) + "{oops\n")
    read = list(read_pairs(path))
    assert [str(r) for r in read if isinstance(r, RowError)] == [
        "line 1: 'chosen' and 'rejected' are the same answer",
        "line 2: 'chosen' must be a non-empty string",
        "line 3: 'rejected' must be a non-empty string",
        "line 5: bad JSON (Expecting property name enclosed in double quotes)",
    ]
    assert read[3].messages(read[3].chosen)[-1] == {"role": "assistant", "content": "circle"}


class StopAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def margins(cli) -> float:
    """The mean DPO reward margin of the training pairs under the module as it is now."""
    return cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]["val/reward_margin"]


def test_dpo_raises_the_margin_and_resumes_exactly(tmp_path, pairs):
    args = [
        "--config", str(ROOT / "samples" / "configs" / "dpo.yaml"),
        *tiny_args(tmp_path / "a", pairs["wrong_train"], pairs["wrong_train"], 6),
        "--model.lr_projector=5e-3", "--model.lr_decoder=5e-3", "--model.beta=0.5", "--model.nll_weight=0",
        "--trainer.val_check_interval=100", "--trainer.callbacks.init_args.every_n_train_steps=2",
    ]  # fmt: skip
    cli = make_cli(args, run=False, method="fit-dpo")
    before = margins(cli)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    after = margins(cli)
    print(f"DPO, 6 steps on 32 tiny pairs: mean reward margin {before:.4f} -> {after:.4f}")
    assert before == 0 and after > 0.1  # the policy starts as the reference
    reference = cli.model.reference.state_dict()
    # Crashed at step 3 (last checkpoint: step 2, mid-epoch), then resumed: the same policy as the run above,
    # the same reference, and the trained model folder.
    crashed = make_cli([*args, f"--trainer.default_root_dir={tmp_path / 'b'}"], run=False, method="fit-dpo")
    crashed.trainer.callbacks.append(StopAt(3))
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.trainer.fit(crashed.model, datamodule=crashed.datamodule)
    main(["fit-dpo", *args, f"--trainer.default_root_dir={tmp_path / 'b'}", "--ckpt_path=last"])
    a, b = load(tmp_path / "a" / "model")[0].state_dict(), load(tmp_path / "b" / "model")[0].state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    resumed = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(resumed[f"reference.{k}"], v) for k, v in reference.items())
    record = json.loads((tmp_path / "b" / "model" / "training.json").read_text())
    assert record["written_by"] == "vlm fit-dpo" and record["model"]["method"]["loss"] == "sigmoid"


def test_reward_model_ranks_held_out_pairs(tmp_path, pairs):
    args = [
        "--config", str(ROOT / "samples" / "configs" / "reward.yaml"),
        *tiny_args(tmp_path, pairs["separable_train"], pairs["separable_val"], 8),
        "--model.lr_head=1e-2", "--model.lr_decoder=1e-3", "--trainer.val_check_interval=8",
        "--trainer.callbacks.init_args.every_n_train_steps=8",
    ]  # fmt: skip
    main(["fit-reward", *args])
    summary = reward(str(pairs["separable_val"]), str(tmp_path / "model"), output=str(tmp_path / "scored.jsonl"))
    print(f"reward model, 8 steps: held-out accuracy {summary['accuracy']:.3f}, margin {summary['mean_margin']:.3f}")
    assert summary["pairs"] == 16 and summary["accuracy"] > 0.9 and summary["broken_rows"] == 0
    scored = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert all(r["chosen_score"] > r["rejected_score"] for r in scored)
    # vlm import-ckpt of the run's last checkpoint (step 8) gives the same reward model: the head comes along.
    import_ckpt(str(tmp_path / "checkpoints" / "last.ckpt"), str(tmp_path / "imported"))
    reward(str(pairs["separable_val"]), str(tmp_path / "imported"), output=str(tmp_path / "rescored.jsonl"))
    assert (tmp_path / "rescored.jsonl").read_text() == (tmp_path / "scored.jsonl").read_text()
    with pytest.raises(VLMError, match="is a reward model: transformers' LLaVA has no class for its scalar head"):
        export_hf(str(tmp_path / "imported"), str(tmp_path / "hf"))  # the head would be lost
    # The reward model as one more GRPO reward: the same scores.
    rewards = Rewards([RewardSpec("reward_model", args={"path": str(tmp_path / "model")})])
    row = scored[0]
    rollouts = [Rollout(row["prompt"], row[k], [], {}, [Path(row["image"])]) for k in ("chosen", "rejected")]
    assert rewards(rollouts)[0]["total"] == pytest.approx([row["chosen_score"], row["rejected_score"]], abs=1e-4)
    # Question rows with an answer get a score each; a folder without a head is refused in one line.
    (tmp_path / "qa.jsonl").write_text(json.dumps({"image": str(SHAPES / "images/train_00000.png"),
                                                   "question": "What?", "answer": "circle"}) + "\n")  # fmt: skip
    assert reward(str(tmp_path / "qa.jsonl"), str(tmp_path / "model"))["rows"] == 1
    (tmp_path / "model" / "reward_head.safetensors").unlink()
    with pytest.raises(VLMError, match="^not a reward model"):
        load_reward_model(tmp_path / "model")


def test_answer_mask_ends_at_the_first_stop_token():
    new = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8]])
    assert answer_mask(new, [2]).tolist() == [[True, True, False, False], [True, True, True, True]]


def shapes_questions(path: Path, count: int) -> list[dict]:
    """The first `count` rows of the mini shapes questions, written to `path` with absolute image paths."""
    rows = [json.loads(line) for line in (SHAPES / "val.jsonl").read_text().splitlines()[:count]]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({**r, "image": str(SHAPES / r["image"])}) + "\n" for r in rows))
    return rows


def test_grpo_raises_the_reward_of_an_easy_rule(tmp_path):
    """The reward is 1 for answers whose first letter is in a-m: about half of a random model's answers, and GRPO's
    few steps make it more."""
    data = tmp_path / "q.jsonl"
    shapes_questions(data, 16)
    args = [
        "--config", str(ROOT / "samples" / "configs" / "grpo.yaml"),
        *tiny_args(tmp_path, data, data, 8),
        "--model.rewards=[{name: format, args: {pattern: '(?s)[a-m].*'}}]",
        "--model.lr_projector=2e-2", "--model.lr_decoder=2e-2", "--model.kl_beta=0.0", "--model.group_size=8",
        "--model.num_iterations=1", "--data.batch_size=4", "--data.generate_samples=0",
        "--trainer.val_check_interval=100", "--trainer.callbacks.init_args.every_n_train_steps=100",
    ]  # fmt: skip
    cli = make_cli(args, run=False, method="fit-grpo")
    cli.datamodule.processor = cli.model.processor
    cli.datamodule.setup("fit")
    gen = next(iter(cli.datamodule.train_dataloader()))["generate"]
    before = sampled_reward(cli.model, gen)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    after = sampled_reward(cli.model, gen)
    print(f"GRPO, 8 steps: mean reward of 64 sampled answers {before:.3f} -> {after:.3f}")
    assert after > before + 0.2


def sampled_reward(module, gen, answers_per_prompt: int = 16) -> float:
    """The mean reward of `answers_per_prompt` answers sampled (with a fixed seed) to each prompt of `gen`."""
    torch.manual_seed(0)
    size, module.group_size = module.group_size, answers_per_prompt
    answers = module._sample(gen)[1]
    module.group_size = size
    scores = module.rewards(module._rollouts(gen, answers, answers_per_prompt))[0]["total"]
    return sum(scores) / len(scores)


def test_grpo_refuses_an_unknown_reward(tmp_path):
    args = ["--config", str(ROOT / "samples" / "configs" / "grpo.yaml"), "--model.init_from=null",
            "--model.config=tiny", "--model.pretrained=false", "--model.rewards=[{name: exactly}]"]  # fmt: skip
    with pytest.raises(VLMError, match="^unknown reward 'exactly'"):
        make_cli(args, run=False, method="fit-grpo")


def test_pairs_from_a_models_mistakes(tmp_path, tiny_checkpoint):
    from vlm.eval.mistakes import generate_preference

    data = tmp_path / "data" / "q.jsonl"
    rows = shapes_questions(data, 6)
    with data.open("a") as f:  # a caption row, which is no question to make pairs from
        f.write(json.dumps({"image": str(SHAPES / rows[0]["image"]), "caption": "not a question"}) + "\n")
    out = tmp_path / "pairs" / "train.jsonl"
    summary = generate_preference(str(data), str(out), str(tiny_checkpoint), samples=2, device="cpu")
    pairs = list(read_pairs(out))
    assert summary["skipped_rows"] == 1 and summary["questions"] == 6 and summary["pairs"] == len(pairs) > 0
    by_question = {r["question"]: r for r in rows}
    for pair in pairs:  # chosen: the reference; rejected: a wrong answer of the model; the row's fields and image kept
        row = by_question[pair.prompt]
        assert pair.chosen == row["answer"] and pair.rejected != row["answer"] and pair.row["type"] == row["type"]
        assert [p.resolve() for p in pair.images] == [SHAPES / row["image"]]
        assert not Path(pair.row["image"]).is_absolute()


def test_grpo_resumes_exactly(tmp_path):
    """A GRPO run crashed after its checkpoint and resumed with --ckpt_path last ends with the same weights as one
    that ran straight through: the sampled answers (the RNG), optimizer, schedule and data position are restored."""
    data = tmp_path / "q.jsonl"
    shapes_questions(data, 8)
    args = [
        "--config", str(ROOT / "samples" / "configs" / "grpo.yaml"),
        *tiny_args(tmp_path / "a", data, data, 6),
        "--model.rewards=[{name: format, args: {pattern: '(?s)[a-m].*'}}]",
        "--model.lr_projector=1e-2", "--model.lr_decoder=1e-2", "--model.group_size=4", "--model.max_new_tokens=3",
        "--data.batch_size=2", "--data.generate_samples=0",
        "--trainer.val_check_interval=100", "--trainer.callbacks.init_args.every_n_train_steps=2",
    ]  # fmt: skip
    main(["fit-grpo", *args])
    # 3 batches of 2 optimizer steps each; crashed at the 3rd batch (step 4), resumed from the checkpoint of step 4.
    crashed = make_cli([*args, f"--trainer.default_root_dir={tmp_path / 'b'}"], run=False, method="fit-grpo")
    crashed.trainer.callbacks.append(StopAt(4))
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.trainer.fit(crashed.model, datamodule=crashed.datamodule)
    main(["fit-grpo", *args, f"--trainer.default_root_dir={tmp_path / 'b'}", "--ckpt_path=last"])
    a, b = load(tmp_path / "a" / "model")[0].state_dict(), load(tmp_path / "b" / "model")[0].state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0


def test_dpo_with_precomputed_reference_log_probs(tmp_path, pairs):
    """With model.precompute_ref_log_probs the run keeps no reference model: the starting model's log-probabilities
    of every pair, computed once at fit start, equal the live reference's (to float noise: other batches, other
    padding), and a resumed run reads them from its checkpoint rather than scoring with the trained model."""
    args = [
        "--config", str(ROOT / "samples" / "configs" / "dpo.yaml"),
        *tiny_args(tmp_path / "a", pairs["wrong_train"], pairs["wrong_val"], 4),
        "--model.lr_projector=5e-3", "--model.lr_decoder=5e-3", "--model.beta=0.5",
        "--trainer.val_check_interval=100", "--trainer.callbacks.init_args.every_n_train_steps=2",
    ]  # fmt: skip
    cli = make_cli([*args, "--model.precompute_ref_log_probs=true"], run=False, method="fit-dpo")
    assert cli.model.reference is None
    cli.datamodule.processor = cli.model.processor
    cli.datamodule.setup("fit")
    batch = next(iter(cli.datamodule.train_dataloader()))
    live = cli.model._live_reference_logps(batch)  # the starting model: what a kept reference would give
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    b = batch["num_samples"]
    policy, tokens = (x.detach() for x in _answer_logps(cli.model.vlm, batch))
    losses = [
        dpo_loss(policy[:b], policy[b:], ref[:b], ref[b:], tokens[:b], tokens[b:], 0.5)[0]
        for ref in (cli.model._reference_logps(batch, "train"), live)
    ]
    assert torch.allclose(*losses, atol=1e-5) and not torch.equal(losses[0], losses[1].new_zeros(b))
    assert len(cli.model.reference_table["val"]) == 16
    saved = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any(k.startswith("reference.") for k in saved["state_dict"])
    assert torch.equal(saved["reference_log_probs"]["train"], cli.model.reference_table["train"])
    # Crashed at step 3 and resumed from step 2: the same model as the run that went straight through.
    resumed = [*args, "--model.precompute_ref_log_probs=true", f"--trainer.default_root_dir={tmp_path / 'b'}"]
    crashed = make_cli(resumed, run=False, method="fit-dpo")
    crashed.trainer.callbacks.append(StopAt(3))
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.trainer.fit(crashed.model, datamodule=crashed.datamodule)
    main(["fit-dpo", *resumed, "--ckpt_path=last"])
    a, b = load(tmp_path / "a" / "model")[0].state_dict(), load(tmp_path / "b" / "model")[0].state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    # Resumed on other data, the saved scores do not fit: refused in one line, not recomputed with the trained model.
    other = make_cli([*resumed, f"--data.train={pairs['wrong_val']}"], run=False, method="fit-dpo")
    with pytest.raises(VLMError, match="^the checkpoint's reference log-probabilities are for 32 train pairs, but"):
        other.trainer.fit(other.model, datamodule=other.datamodule, ckpt_path="last")
