"""GRPO (text_method grpo): a text LoRA samples answers to prompts and learns from their rewards.

Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath) through the one training loop.
Per micro-batch of prompts: `grpo_generations` answers to each are sampled from the current
policy (temperature `grpo_temperature`, at most `grpo_max_new_tokens` tokens), scored by the
`grpo_rewards` functions (core.train.rewards), and each answer's advantage is its reward minus
its group's mean, over the group's std. The loss of an answer is the mean over its tokens of
-A * pi/pi.detach() (one policy update per sample, so the ratio is 1 and its gradient the
policy gradient) + grpo_kl * the k3 estimate of KL(policy || reference), with the reference
the model with the adapter switched off (as DPO and KTO here: no second copy in memory);
answers count equally. TRL's GRPOTrainer is not used: it owns its own loop (and generation
server); this app has one loop for every method, with stop, exact resume (sampling draws from
the training RNG, which checkpoints keep) and several GPUs.

TensorBoard and the live plot get the mean reward of each step's samples; validation is the
mean reward of greedy answers to the held-out prompts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from collections.abc import Sequence

import torch

from core.config import TrainConfig
from core.data import rl_data
from core.data import text as text_data
from core.data.text import IGNORE_INDEX, TokenizedExample
from core.events import RunContext
from core.sample_text import _stop_ids
from core.train import distributed
from core.train.preference_step import segment_logps, sequence_segments
from core.train.rewards import RewardSet
from core.train.text import TextRun
from core.train.text_batches import epoch_batches, make_batch


@dataclass
class Prompts:
    train: list[rl_data.RewardPrompt]
    validation: list[rl_data.RewardPrompt] = field(default_factory=list)

    def describe(self) -> str:
        return f"{len(self.train)} prompts" + (f", {len(self.validation)} for validation" if self.validation else "")


def read_data(cfg: TrainConfig) -> Prompts:
    RewardSet.parse(list(cfg.grpo_rewards))  # a bad reward fails before the model loads
    prompts = rl_data.load_prompts(cfg.train_data_dir)
    if cfg.validation_file:
        return Prompts(prompts, rl_data.load_prompts(cfg.validation_file))
    train, held = text_data.split_validation(prompts, cfg.validation_split, cfg.seed)
    return Prompts(train, held)


def prepare_data(cfg: TrainConfig, prompts: Prompts, tokenizer: Any, ctx: RunContext) -> Prompts:
    return prompts  # prompts are tokenized when answers are sampled


def advantages(rewards: torch.Tensor, generations: int) -> torch.Tensor:
    """(reward - its group's mean) / (the group's std + 1e-4); rewards grouped by prompt, `generations` each."""
    grouped = rewards.view(-1, generations)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True) if generations > 1 else torch.zeros_like(mean)
    return ((grouped - mean) / (std + 1e-4)).view(-1)


def grpo_token_loss(policy: torch.Tensor, reference: torch.Tensor, advantage: torch.Tensor, beta: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss, per-token k3 KL): -A * ratio + beta * (exp(ref - pi) - (ref - pi) - 1)."""
    ratio = torch.exp(policy - policy.detach())
    delta = reference - policy
    kl = torch.exp(delta) - delta - 1
    return -advantage * ratio + beta * kl, kl.detach()


@dataclass
class Sampled:
    """A micro-batch's sampled answers as one training batch (prompt tokens without loss)."""

    batch: Any  # TextBatch
    segments: torch.Tensor
    rewards: torch.Tensor  # (answers,)
    completions: list[str]

    @property
    def count(self) -> int:
        return int(self.rewards.numel())


@dataclass
class GrpoRun(TextRun):
    rewards: Any = None  # RewardSet
    last_scalars: dict[str, float] = field(default_factory=dict)
    validation_stats: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rewards = RewardSet.parse(list(self.cfg.grpo_rewards))

    def batches(self, epoch: int) -> list[list[rl_data.RewardPrompt]]:  # type: ignore[override]
        order = self.shard(epoch_batches(len(self.data.train), self.cfg.batch_size, self.cfg.seed, epoch))
        return [[self.data.train[i] for i in indices] for indices in order]

    epoch_batches = batches  # type: ignore[assignment]

    def plan(self, total: int) -> str:
        cfg = self.cfg
        return (f"{super().plan(total)}; GRPO on {self.data.describe()}, {cfg.grpo_generations} answers each "
                f"(temperature {cfg.grpo_temperature:g}, up to {cfg.grpo_max_new_tokens} tokens), rewards "
                f"{', '.join(cfg.grpo_rewards)}, KL weight {cfg.grpo_kl:g}")

    # --- sampling ------------------------------------------------------------------------------
    def _prompt_ids(self, prompt: rl_data.RewardPrompt) -> list[int]:
        text = self.tokenizer.apply_chat_template(prompt.prompt, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def _generate(self, prompt_ids: list[list[int]], *, greedy: bool = False) -> list[list[int]]:
        """Each prompt's answers as token ids (ending with the stop token when one came)."""
        cfg, tokenizer = self.cfg, self.tokenizer
        count = 1 if greedy else cfg.grpo_generations
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        width = max(len(ids) for ids in prompt_ids)
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in prompt_ids], device=self.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids], device=self.device)
        stops = _stop_ids(tokenizer)
        causal_lm = self.causal_lm
        was_training = causal_lm.training
        causal_lm.eval()
        try:
            sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": cfg.grpo_temperature,
                                                            "top_k": 0, "top_p": 1.0}
            output = self.model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=cfg.grpo_max_new_tokens,
                                         num_return_sequences=count, pad_token_id=pad_id, eos_token_id=stops,
                                         use_cache=True, **sampling)
        finally:
            if was_training:
                causal_lm.train()
        answers = []
        for row in output[:, width:].tolist():
            cut = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
            answers.append(row[:cut])
        return answers

    def _score(self, prompts: list[rl_data.RewardPrompt], answers: list[list[int]], per_prompt: int
               ) -> tuple[torch.Tensor, list[str]]:
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in answers]
        rewards = [self.rewards.score(prompts[i // per_prompt].text, text, prompts[i // per_prompt].row)
                   for i, text in enumerate(texts)]
        return torch.tensor(rewards, dtype=torch.float32), texts

    def sample(self, prompts: list[rl_data.RewardPrompt]) -> Sampled:
        prompt_ids = [self._prompt_ids(p) for p in prompts]
        answers = self._generate(prompt_ids)
        per_prompt = self.cfg.grpo_generations
        rewards, texts = self._score(prompts, answers, per_prompt)
        sequences = []
        for index, answer in enumerate(answers):
            ids = prompt_ids[index // per_prompt]
            answer = answer or [self.tokenizer.eos_token_id]
            sequences.append(TokenizedExample([*ids, *answer], [IGNORE_INDEX] * len(ids) + answer,
                                              prompts[index // per_prompt].source))
        pad_id = self.tokenizer.pad_token_id or 0
        batch = make_batch(sequences, pad_id)
        return Sampled(batch, sequence_segments(batch, [len(s) for s in sequences]), rewards, texts)

    # --- the loop's step -----------------------------------------------------------------------
    def train_step(self, group: Sequence[list[rl_data.RewardPrompt]]) -> float:  # type: ignore[override]
        generations = self.cfg.grpo_generations
        divisor = self.step_divisor(sum(len(prompts) * generations for prompts in group))
        loss_total, tokens = 0.0, 0
        rewards, kls = [], []
        for index, prompts in enumerate(group):
            sampled = self.sample(prompts)
            advantage = advantages(sampled.rewards, generations).to(self.device)
            with distributed.sync_on_last(self.accelerator, [self.trained], index, len(group)):
                with torch.no_grad(), self.model.disable_adapter():
                    reference = segment_logps(self.causal_lm, sampled.batch, sampled.segments, sampled.count,
                                              self.device, self.precision).token_logps
                policy = segment_logps(self.trained, sampled.batch, sampled.segments, sampled.count, self.device,
                                       self.precision)
                per_token, kl = grpo_token_loss(policy.token_logps, reference, advantage[policy.owner],
                                                self.cfg.grpo_kl)
                count = policy.tokens.clamp(min=1)
                losses = torch.zeros_like(count).index_add(0, policy.owner, per_token) / count
                (losses.sum() / divisor).backward()
            loss_total += float(losses.detach().sum())
            tokens += sampled.batch.tokens
            rewards.append(sampled.rewards)
            kls.append(float(kl.mean()) if kl.numel() else 0.0)
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        reward = torch.cat(rewards)
        kl_mean = sum(kls) / max(1, len(kls))
        if self.world == 1:
            loss, _ = self.step_loss(loss_total, tokens, divisor)
            self.last_scalars = {"reward/mean": float(reward.mean()), "reward/std": float(reward.std()) if
                                 reward.numel() > 1 else 0.0, "grpo/kl": kl_mean}
            return loss
        loss, (reward_sum, count_all, kl_sum) = self.step_loss(loss_total, tokens, divisor, float(reward.sum()),
                                                               float(reward.numel()), kl_mean)
        self.last_scalars = {"reward/mean": reward_sum / max(1.0, count_all), "grpo/kl": kl_sum / self.world}
        return loss

    def step_scalars(self) -> dict[str, float]:
        return self.last_scalars

    def validate(self, step: int) -> float | None:
        """The mean reward of greedy answers to the held-out prompts (logged; GRPO has no validation loss)."""
        if not self.data.validation or not self.main:
            return None
        prompts = self.data.validation
        answers = self._generate([self._prompt_ids(p) for p in prompts], greedy=True)
        rewards, _ = self._score(prompts, answers, 1)
        self.validation_stats = {"validation_reward": round(float(rewards.mean()), 4)}
        self.ctx.log(f"Validation at step {step}: mean reward of greedy answers to {len(prompts)} held-out prompts "
                     f"{self.validation_stats['validation_reward']:.3f}")
        return None

    def summary_extra(self) -> dict[str, Any]:
        return {"text_method": "grpo", "grpo_rewards": list(self.cfg.grpo_rewards),
                "grpo_generations": self.cfg.grpo_generations, "prompts": len(self.data.train),
                "last_reward": self.last_scalars.get("reward/mean"), **self.validation_stats}


RUN_CLASS = GrpoRun
