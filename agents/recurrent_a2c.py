"""Recurrent A2C: synchronous advantage actor-critic (Mnih et al., 2016) for recurrent policies.

Neither SB3 nor sb3-contrib has one (their issues close such requests as duplicates of RecurrentPPO). This is SB3's
:class:`~stable_baselines3.A2C` (same loss, same defaults, same logger keys; RMSprop with its running average
bias-corrected, see below) on sb3-contrib's
recurrent machinery (the rollout collection of ``RecurrentPPO``, which carries the recurrent states, and its
recurrent rollout buffers). Any of the project's recurrent policies works, RIM and LSTM alike::

    from rims_rl.agents.recurrent_a2c import RecurrentA2C
    model = RecurrentA2C("RIMPolicy", "CartPoleNoVel-v1", n_steps=16)
    model.learn(100_000)

One update per rollout, a single gradient step on the whole rollout (``n_envs x n_steps`` samples):

- the rollout is cut into sequences: each env's steps in order, a new sequence at every episode start (whose
  recurrent state is reset to zeros). Each sequence starts from the recurrent state stored when it was collected, and
  backpropagation runs through the whole sequence (truncated BPTT at the rollout's start). Unlike
  ``RecurrentRolloutBuffer.get``, no sequence is cut at a random index;
- the loss is SB3's A2C loss averaged over the real steps only (the padded steps of shorter sequences are masked
  out)::

      loss = -mean(A_t * log pi(a_t | h_t)) + vf_coef * mean((R_t - V(h_t))^2) - ent_coef * mean(H[pi(. | h_t)])

  with ``A_t``, ``R_t`` SB3's GAE advantages and returns (``gae_lambda=1``: n-step returns), no ratio and no clipping
  of the objective; the gradient norm is clipped at ``max_grad_norm`` as in SB3's A2C;
- RMSprop (``alpha=0.99, eps=1e-5``, the settings SB3 took from OpenAI baselines; the paper's App. C.8 used RMSprop
  with learning rate 7e-4) unless ``use_rms_prop=False`` (then the policy's optimiser, Adam). Unlike SB3's A2C, the
  running average of squared gradients is bias-corrected (:class:`RMSpropBiasCorrected`): ``torch.optim.RMSprop``
  starts it at 0, so its first steps move every weight by up to ``lr / sqrt(1 - alpha)`` = 10x the learning rate in
  the sign of its gradient. On BabyAI object picking those first ~5 updates drove 80% of the LSTM's gate
  pre-activations past 3 (saturated), after which the policy no longer depended on its observation and stayed at
  chance for the whole run (RIM likewise); SB3's own feed-forward A2C is stuck the same way there. TF's RMSprop
  (SB3's ``RMSpropTFLike``) starts the average at 1 instead, which avoids the overshoot but makes the first hundreds
  of updates plain SGD steps of ``lr * gradient``, too small to learn within 200k steps there.

:attr:`RecurrentA2C.iterations` counts updates across resumed runs, as in :class:`rims_rl.agents.ppo.RecurrentPPO`.
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

import torch as th
from gymnasium import spaces
from sb3_contrib import RecurrentPPO as _SB3ContribRecurrentPPO
from sb3_contrib.common.recurrent.buffers import RecurrentDictRolloutBuffer, RecurrentRolloutBuffer
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from sb3_contrib.common.recurrent.type_aliases import RNNStates
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, Schedule
from stable_baselines3.common.utils import explained_variance
from torch.nn import functional as F

from rims_rl.agents.buffers import COMPACT_BUFFERS, compact_buffer_class, whole_rollout
from rims_rl.agents.ppo import POLICY_ALIASES, IterationCounter

__all__ = ["RMSpropBiasCorrected", "RecurrentA2C", "a2c_loss"]

SelfRecurrentA2C = TypeVar("SelfRecurrentA2C", bound="RecurrentA2C")


class RMSpropBiasCorrected(th.optim.Adam):
    """RMSprop whose running average of squared gradients is bias-corrected as Adam's second moment.

    ``v_t = alpha * v_{t-1} + (1 - alpha) * g_t**2``, ``w -= lr * g_t / (sqrt(v_t / (1 - alpha**t)) + eps)``: the
    update of ``torch.optim.RMSprop`` once its average has warmed up, without the first steps of up to
    ``lr / sqrt(1 - alpha)`` (module docstring). It is Adam without momentum (``betas=(0, alpha)``), so it is
    implemented as one and its state is Adam's.
    """

    def __init__(self, params: Any, lr: float = 7e-4, alpha: float = 0.99, eps: float = 1e-5, weight_decay: float = 0):
        super().__init__(params, lr=lr, betas=(0.0, alpha), eps=eps, weight_decay=weight_decay)


def a2c_loss(
    log_prob: th.Tensor,
    values: th.Tensor,
    entropy: th.Tensor | None,
    advantages: th.Tensor,
    returns: th.Tensor,
    mask: th.Tensor,
    ent_coef: float,
    vf_coef: float,
) -> tuple[th.Tensor, dict[str, th.Tensor]]:
    """SB3's A2C loss averaged over the steps where ``mask`` is True (all inputs flat, one entry per padded step).

    Without an analytic entropy (e.g. squashed Gaussians) the entropy is estimated by ``-log_prob``, as in SB3.
    Returns the loss and its three terms (``policy_loss``, ``value_loss``, ``entropy_loss``).
    """
    policy_loss = -(advantages * log_prob)[mask].mean()
    value_loss = F.mse_loss(returns[mask], values[mask])
    entropy_loss = (log_prob[mask] if entropy is None else -entropy[mask]).mean()
    loss = policy_loss + ent_coef * entropy_loss + vf_coef * value_loss
    return loss, {"policy_loss": policy_loss, "value_loss": value_loss, "entropy_loss": entropy_loss}


class _RecurrentRollouts(OnPolicyAlgorithm):
    # sb3-contrib's rollout collection (recurrent states carried across steps, stored per step, reset at episode
    # starts; timeouts bootstrapped): it only reads what OnPolicyAlgorithm and RecurrentA2C._setup_model define.
    collect_rollouts = _SB3ContribRecurrentPPO.collect_rollouts


class RecurrentA2C(IterationCounter, _RecurrentRollouts):
    """Advantage actor-critic for recurrent policies (module docstring). Parameters are SB3's ``A2C`` ones:

    :param policy: a recurrent policy class or one of :data:`rims_rl.agents.ppo.POLICY_ALIASES` (``"RIMPolicy"``,
        ``"MultiInputLstmPolicy"``, ...).
    :param env: the environment (an id, a gymnasium env or a VecEnv).
    :param learning_rate: learning rate, or a schedule of the remaining progress (1 -> 0).
    :param n_steps: steps per env per update; the update backpropagates through at most this many steps.
    :param gamma: discount factor.
    :param gae_lambda: GAE lambda (1: plain n-step returns, as in A2C).
    :param ent_coef: entropy coefficient.
    :param vf_coef: value-loss coefficient.
    :param max_grad_norm: the gradient norm is clipped to this.
    :param rms_prop_eps: RMSprop epsilon (its ``alpha`` is 0.99).
    :param use_rms_prop: RMSprop, bias-corrected (:class:`RMSpropBiasCorrected`; default), or the policy's optimiser
        (Adam). An ``optimizer_class`` in ``policy_kwargs`` wins over both.
    :param use_sde: generalised state-dependent exploration (continuous actions).
    :param sde_sample_freq: resample the gSDE noise every N steps (-1: once per rollout).
    :param normalize_advantage: normalise the advantages of each rollout.
    :param stats_window_size: episodes averaged in ``rollout/ep_rew_mean``.
    :param tensorboard_log: TensorBoard log directory.
    :param policy_kwargs: policy keyword arguments.
    :param verbose: 0 silent, 1 info.
    :param seed: random seed.
    :param device: ``auto``, ``cpu`` or ``cuda``.
    :param _init_setup_model: build the networks now.
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = POLICY_ALIASES

    def __init__(
        self,
        policy: str | type[RecurrentActorCriticPolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule = 7e-4,
        n_steps: int = 5,
        gamma: float = 0.99,
        gae_lambda: float = 1.0,
        ent_coef: float = 0.0,
        vf_coef: float = 0.5,
        max_grad_norm: float = 0.5,
        rms_prop_eps: float = 1e-5,
        use_rms_prop: bool = True,
        use_sde: bool = False,
        sde_sample_freq: int = -1,
        normalize_advantage: bool = False,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        _init_setup_model: bool = True,
    ):
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            n_steps=n_steps,
            gamma=gamma,
            gae_lambda=gae_lambda,
            ent_coef=ent_coef,
            vf_coef=vf_coef,
            max_grad_norm=max_grad_norm,
            use_sde=use_sde,
            sde_sample_freq=sde_sample_freq,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            seed=seed,
            device=device,
            _init_setup_model=False,
            supported_action_spaces=(spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary),
        )
        self.normalize_advantage = normalize_advantage
        self.rms_prop_eps = rms_prop_eps
        self.use_rms_prop = use_rms_prop
        self._last_lstm_states: RNNStates | None = None
        # RMSprop with SB3's settings, bias-corrected (module docstring), unless the user chose an optimiser.
        if use_rms_prop and "optimizer_class" not in self.policy_kwargs:
            self.policy_kwargs["optimizer_class"] = RMSpropBiasCorrected
            self.policy_kwargs["optimizer_kwargs"] = dict(alpha=0.99, eps=rms_prop_eps, weight_decay=0)
        if _init_setup_model:
            self._setup_model()

    def _setup_model(self) -> None:
        self._setup_lr_schedule()
        self.set_random_seed(self.seed)
        self.policy = self.policy_class(  # type: ignore[assignment]
            self.observation_space, self.action_space, self.lr_schedule, use_sde=self.use_sde, **self.policy_kwargs
        ).to(self.device)
        if not isinstance(self.policy, RecurrentActorCriticPolicy):
            raise ValueError(f"RecurrentA2C needs a recurrent policy, got {type(self.policy).__name__}")
        core = self.policy.lstm_actor
        state_shape = (core.num_layers, self.n_envs, core.hidden_size)
        zeros = lambda: th.zeros(state_shape, device=self.device)
        self._last_lstm_states = RNNStates((zeros(), zeros()), (zeros(), zeros()))
        if getattr(self.policy, "compact_observations", False):
            buffer_cls: type = compact_buffer_class(self.observation_space)
        elif isinstance(self.observation_space, spaces.Dict):
            buffer_cls = RecurrentDictRolloutBuffer
        else:
            buffer_cls = RecurrentRolloutBuffer
        self.rollout_buffer = buffer_cls(
            self.n_steps,
            self.observation_space,
            self.action_space,
            (self.n_steps, core.num_layers, self.n_envs, core.hidden_size),
            self.device,
            gamma=self.gamma,
            gae_lambda=self.gae_lambda,
            n_envs=self.n_envs,
        )

    def train(self) -> None:
        """One gradient step on the whole rollout (module docstring)."""
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        data = whole_rollout(self.rollout_buffer)
        mask = data.mask > 1e-8
        actions = data.actions
        if isinstance(self.action_space, spaces.Discrete):
            actions = actions.long().flatten()
        compact = isinstance(self.rollout_buffer, COMPACT_BUFFERS)
        self.policy.padding_mask = mask if compact else None  # type: ignore[union-attr]
        try:
            values, log_prob, entropy = self.policy.evaluate_actions(
                data.observations, actions, data.lstm_states, data.episode_starts
            )
        finally:
            self.policy.padding_mask = None  # type: ignore[union-attr]
        advantages = data.advantages
        if self.normalize_advantage:
            real = advantages[mask]
            advantages = (advantages - real.mean()) / (real.std() + 1e-8)
        loss, terms = a2c_loss(
            log_prob, values.flatten(), entropy, advantages, data.returns, mask, self.ent_coef, self.vf_coef
        )
        self.policy.optimizer.zero_grad()
        loss.backward()
        th.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
        self.policy.optimizer.step()
        self._n_updates += 1

        explained_var = explained_variance(self.rollout_buffer.values.flatten(), self.rollout_buffer.returns.flatten())
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/explained_variance", explained_var)
        self.logger.record("train/entropy_loss", terms["entropy_loss"].item())
        self.logger.record("train/policy_loss", terms["policy_loss"].item())
        self.logger.record("train/value_loss", terms["value_loss"].item())
        if hasattr(self.policy, "log_std"):
            self.logger.record("train/std", th.exp(self.policy.log_std).mean().item())

    def learn(
        self: SelfRecurrentA2C,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 100,
        tb_log_name: str = "RecurrentA2C",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfRecurrentA2C:
        return super().learn(
            total_timesteps=total_timesteps,
            callback=callback,
            log_interval=log_interval,
            tb_log_name=tb_log_name,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=progress_bar,
        )

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "_last_lstm_states"]
